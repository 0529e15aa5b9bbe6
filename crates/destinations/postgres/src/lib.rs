//! The `postgres` destination: dynamic PostgreSQL login roles (to be written).
