//! RFC 7662 token introspection for lanyard-issued tokens (to be written).
