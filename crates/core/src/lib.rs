//! Core types shared by every lanyard crate: identifiers, scopes, TTLs, the injected
//! [`Clock`], stable [`ReasonCode`]s and the secret wrapper. No I/O lives here.

pub mod clock;
pub mod ids;
pub mod reason;
pub mod secret;

pub use clock::{Clock, FakeClock, SharedClock, SystemClock, UnixTime};
pub use ids::{GrantId, IdError, Scope, TaskId, Ttl, WorkloadId};
pub use reason::ReasonCode;
pub use secret::Secret;
