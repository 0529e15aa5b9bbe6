// A minimal lanyard workload client in TypeScript: @grpc/grpc-js with the repository's
// proto files loaded at run time by @grpc/proto-loader (no generated code). Copy it,
// or generate typed stubs instead (docs/clients.md).

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

/** proto/ of the lanyard repository (override with LANYARD_PROTO_DIR). */
export const PROTO_DIR =
  process.env.LANYARD_PROTO_DIR ??
  join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..", "proto");

// Field names as in the proto (keepCase), int64 as strings, enums as their names.
export interface ExchangeRequest {
  subject_token: string;
  destination: string;
  scopes?: string[];
  requested_ttl_seconds?: number;
  subject_token_type?: string;
  audience?: string;
}

export interface Timestamp {
  seconds: string;
  nanos: number;
}

export interface BearerToken {
  /** Secret: never log it. */
  token: string;
  token_type: string;
  issued_token_type: string;
  header: string;
}

export interface Credential {
  kind: "bearer" | "aws" | "database";
  bearer?: BearerToken;
  aws?: { access_key_id: string; secret_access_key: string; session_token: string; region: string };
  database?: { host: string; port: number; database: string; username: string; password: string };
}

export interface ExchangeResponse {
  grant_id: string;
  credential: Credential;
  expires_at: Timestamp;
  scopes: string[];
  workload_id: string;
  task_id: string;
  destination: string;
  revocability: string;
}

export interface ReleaseResponse {
  grant_id: string;
  status: string;
  receipt: { outcome: string; detail: string };
}

/** A refused call: lanyard's stable reason code (docs/api.md) and its message. */
export class LanyardError extends Error {
  constructor(
    readonly reason: string | undefined,
    readonly code: grpc.status,
    readonly details: string,
    readonly requestId: string | undefined,
  ) {
    super(`${reason ?? grpc.status[code]}: ${details}`);
    this.name = "LanyardError";
  }
}

function first(md: grpc.Metadata | undefined, key: string): string | undefined {
  const v = md?.get(key)[0];
  return v === undefined ? undefined : v.toString();
}

/** The reason is also in the google.rpc.ErrorInfo of the status details (domain
 * "lanyard.dev"); the `lanyard-reason` metadata key repeats it and needs no decoding. */
function toLanyardError(e: grpc.ServiceError): LanyardError {
  return new LanyardError(
    first(e.metadata, "lanyard-reason"),
    e.code,
    e.details,
    first(e.metadata, "x-request-id"),
  );
}

type Unary<Req, Res> = (
  req: Req,
  opts: grpc.CallOptions,
  cb: (err: grpc.ServiceError | null, res?: Res) => void,
) => grpc.ClientUnaryCall;

interface ExchangeServiceClient extends grpc.Client {
  Exchange: Unary<ExchangeRequest, ExchangeResponse>;
  Renew: Unary<{ grant_id: string; subject_token: string; requested_ttl_seconds?: number }, ExchangeResponse>;
  Release: Unary<{ grant_id: string; subject_token: string }, ReleaseResponse>;
}

/** A client of `lanyard.v1.ExchangeService`. */
export class Lanyard {
  private readonly client: ExchangeServiceClient;

  /** `target` is `host:port`, `http://host:port` (plaintext) or `https://host:port` (TLS). */
  constructor(target: string, readonly timeoutMs = 10_000) {
    const definition = protoLoader.loadSync("lanyard/v1/exchange.proto", {
      includeDirs: [PROTO_DIR],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const pkg = grpc.loadPackageDefinition(definition) as any;
    const tls = target.startsWith("https://");
    const address = target.replace(/^https?:\/\//, "");
    const creds = tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
    this.client = new pkg.lanyard.v1.ExchangeService(address, creds);
  }

  private call<Req, Res>(method: Unary<Req, Res>, req: Req): Promise<Res> {
    return new Promise((resolve, reject) => {
      method.call(this.client, req, { deadline: Date.now() + this.timeoutMs }, (err, res) => {
        if (err) reject(toLanyardError(err));
        else resolve(res as Res);
      });
    });
  }

  exchange(req: ExchangeRequest): Promise<ExchangeResponse> {
    return this.call(this.client.Exchange, req);
  }

  renew(grantId: string, subjectToken: string, ttlSeconds = 0): Promise<ExchangeResponse> {
    return this.call(this.client.Renew, {
      grant_id: grantId,
      subject_token: subjectToken,
      requested_ttl_seconds: ttlSeconds,
    });
  }

  release(grantId: string, subjectToken: string): Promise<ReleaseResponse> {
    return this.call(this.client.Release, { grant_id: grantId, subject_token: subjectToken });
  }

  close(): void {
    this.client.close();
  }
}

/** The token in a file, read on each call (Kubernetes rotates projected tokens). */
export function readToken(path: string): string {
  return readFileSync(path, "utf8").trim();
}

/** When the credential expires. */
export function expiresAt(res: ExchangeResponse): Date {
  return new Date(Number(res.expires_at.seconds) * 1000 + Math.floor(res.expires_at.nanos / 1e6));
}
