//! Revocation (to be written).
