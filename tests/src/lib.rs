//! End-to-end tests: each starts the real `lanyard` binary on loopback (see `tests/`).
