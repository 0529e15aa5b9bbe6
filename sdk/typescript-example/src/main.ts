// Exchange a workload token for a credential, show what came back (never the secret),
// and release the grant.
//
//   node dist/src/main.js --target http://127.0.0.1:7600 --token-file token.jwt \
//     --destination dev-api [--scope read ...] [--ttl 300] [--keep]

import { parseArgs } from "node:util";

import { Lanyard, LanyardError, expiresAt, readToken } from "./lanyard.js";

const { values } = parseArgs({
  options: {
    target: { type: "string", default: process.env.LANYARD_GRPC ?? "http://127.0.0.1:7600" },
    "token-file": { type: "string" },
    destination: { type: "string" },
    scope: { type: "string", multiple: true, default: [] },
    ttl: { type: "string", default: "0" },
    keep: { type: "boolean", default: false },
  },
});
if (!values["token-file"] || !values.destination) {
  console.error(
    "usage: main.js --target URL --token-file FILE --destination NAME [--scope S]... [--ttl SECS] [--keep]",
  );
  process.exit(2);
}
const tokenFile = values["token-file"];

const lanyard = new Lanyard(values.target!);
try {
  const grant = await lanyard.exchange({
    subject_token: readToken(tokenFile),
    destination: values.destination,
    scopes: values.scope,
    requested_ttl_seconds: Number(values.ttl),
  });
  const cred = grant.credential;
  console.log(`grant ${grant.grant_id}`);
  console.log(`workload ${grant.workload_id} task ${grant.task_id || "-"}`);
  console.log(`destination ${grant.destination} scopes ${grant.scopes.join(" ") || "-"}`);
  console.log(`expires ${expiresAt(grant).toISOString()} (${grant.revocability})`);
  if (cred.kind === "bearer" && cred.bearer) {
    const { header, token_type, token } = cred.bearer;
    console.log(`credential: present it as "${header}: ${token_type} <${token.length}-byte token>"`);
  } else {
    console.log(`credential: ${cred.kind}`);
  }
  if (!values.keep) {
    // Fresh proof for the release: read the token again.
    const released = await lanyard.release(grant.grant_id, readToken(tokenFile));
    console.log(`released: ${released.status} (${released.receipt.outcome})`);
  }
} catch (e) {
  if (e instanceof LanyardError) {
    console.error(`refused: ${e.reason ?? "no reason"} (${e.details}) request ${e.requestId ?? "-"}`);
    process.exitCode = 1;
  } else {
    throw e;
  }
} finally {
  lanyard.close();
}
