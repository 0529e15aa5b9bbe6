// The example against the real lanyard binary: `lanyard serve --dev` on loopback with a
// throwaway data directory, a token from `lanyard dev token`, then an exchange, a
// renewal, a release, a refusal with its reason, and main.js run as a user would.

import assert from "node:assert/strict";
import { ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Lanyard, LanyardError, expiresAt } from "../src/lanyard.js";

const here = dirname(fileURLToPath(import.meta.url)); // dist/test
const repo = join(here, "..", "..", "..", "..");
const bin = process.env.LANYARD_BIN ?? join(repo, "target", "debug", "lanyard");
const patienceMs = Number(process.env.LANYARD_TEST_PATIENCE_SECS ?? "30") * 1000;

let dir: string;
let server: ChildProcess;
let target: string;
let tokenFile: string;

function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("LANYARD_")) env[k] = v;
  env.no_proxy = env.NO_PROXY = "127.0.0.1,localhost";
  return env;
}

function mint(subject: string, task: string): string {
  return execFileSync(bin, ["dev", "token", "--data-dir", join(dir, "data"), "--subject", subject, "--task", task], {
    env: cleanEnv(),
    encoding: "utf8",
  }).trim();
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "lanyard-ts-"));
  const data = join(dir, "data");
  server = spawn(
    bin,
    ["serve", "--dev", "--data-dir", data, "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
      "--admin-socket", join(data, "admin.sock")],
    { env: cleanEnv(), stdio: ["ignore", "pipe", openSync(join(dir, "lanyard.log"), "a")] },
  );
  const log = () => readFileSync(join(dir, "lanyard.log"), "utf8");
  // The ready line, against a deadline; stdout keeps being read afterwards.
  const lines = createInterface({ input: server.stdout! });
  const ready = await new Promise<string>((resolve, reject) => {
    const fail = (why: string) => reject(new Error(`lanyard ${why}:\n${log()}`));
    const timer = setTimeout(() => fail(`printed no ready line within ${patienceMs} ms`), patienceMs);
    server.once("exit", (code) => fail(`exited (${code}) before it was ready`));
    lines.on("line", (line) => {
      if (line.startsWith("lanyard ready ")) {
        clearTimeout(timer);
        resolve(line);
      }
    });
  });
  const grpcAddr = /grpc=(\S+)/.exec(ready)![1];
  target = `http://${grpcAddr}`;
  tokenFile = join(dir, "token.jwt");
  writeFileSync(tokenFile, mint("ts-agent", "run-1") + "\n", { mode: 0o600 });
});

after(async () => {
  if (server && server.exitCode === null) {
    const exited = new Promise((resolve) => server.once("exit", resolve));
    server.kill("SIGTERM");
    const timer = setTimeout(() => server.kill("SIGKILL"), 20_000);
    await exited;
    clearTimeout(timer);
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test("exchange, renew and release a dev-api credential", async () => {
  const token = mint("ts-agent", "run-1");
  const lanyard = new Lanyard(target);
  try {
    const grant = await lanyard.exchange({
      subject_token: token,
      destination: "dev-api",
      scopes: ["read"],
      requested_ttl_seconds: 120,
    });
    assert.match(grant.grant_id, /^grt_/);
    assert.equal(grant.workload_id, "spiffe://lanyard.local/dev/ts-agent");
    assert.equal(grant.task_id, "run-1");
    assert.deepEqual(grant.scopes, ["read"]);
    assert.equal(grant.revocability, "REVOCABILITY_IMMEDIATE");
    assert.equal(grant.credential.kind, "bearer");
    assert.equal(grant.credential.bearer!.token.split(".").length, 3);
    const left = expiresAt(grant).getTime() - Date.now();
    assert.ok(left > 100_000 && left <= 121_000, `expires in ${left} ms`);

    const renewed = await lanyard.renew(grant.grant_id, mint("ts-agent", "run-1"), 120);
    assert.equal(renewed.grant_id, grant.grant_id);
    assert.notEqual(renewed.credential.bearer!.token, grant.credential.bearer!.token);

    const released = await lanyard.release(grant.grant_id, token);
    assert.equal(released.status, "released");
    await assert.rejects(lanyard.release(grant.grant_id, token), (e: unknown) => {
      assert.ok(e instanceof LanyardError);
      assert.equal(e.reason, "GRANT_NOT_ACTIVE");
      return true;
    });
  } finally {
    lanyard.close();
  }
});

test("a refusal carries its reason code", async () => {
  const lanyard = new Lanyard(target);
  try {
    const unknown = lanyard.exchange({ subject_token: mint("ts-agent", "run-1"), destination: "no-such-api" });
    await assert.rejects(unknown, (e: unknown) => {
      assert.ok(e instanceof LanyardError);
      assert.equal(e.reason, "DESTINATION_UNKNOWN");
      assert.ok(e.requestId);
      return true;
    });
    const malformed = lanyard.exchange({ subject_token: "not-a-jwt", destination: "dev-api" });
    await assert.rejects(malformed, (e: unknown) => {
      assert.ok(e instanceof LanyardError);
      assert.equal(e.reason, "TOKEN_MALFORMED");
      return true;
    });
  } finally {
    lanyard.close();
  }
});

test("main.js exchanges and releases, printing no secret", () => {
  const out = execFileSync(
    process.execPath,
    [
      join(here, "..", "src", "main.js"),
      ...["--target", target, "--token-file", tokenFile, "--destination", "dev-api", "--scope", "read"],
    ],
    { env: cleanEnv(), encoding: "utf8" },
  );
  assert.match(out, /^grant grt_/m);
  assert.match(out, /^released: released \(revoked\)$/m);
  assert.match(out, /present it as "authorization: Bearer <\d+-byte token>"/);
  assert.doesNotMatch(out, /eyJ/); // no JWT text
});
