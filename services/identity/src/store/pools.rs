//! identity's two PostgreSQL pools: one for calls, and a few connections set
//! apart for the batch writers (the reservation lanes and the audit ingest).
//!
//! A batch writes its users and audit entries in multi-row inserts, one
//! statement text per number of rows; sqlx prepares each text on the
//! connection that runs it and keeps it there (with a type per parameter: a
//! 1,000-row insert of users alone keeps about half a MiB). On one pool every
//! connection came to hold the large ones, about 15 MiB over sixteen
//! connections at identity's peak; on a pool of their own they stay on
//! [`WRITE_CONNECTIONS`] connections. The writers also never wait for a
//! connection behind calls, nor calls behind them.

use usher_kit::config::DatabaseConfig;

use crate::app::directory::RESERVATION_LANES;

/// Connections set apart for the batch writers: one per reservation lane
/// (each runs one batch at a time) and one for the audit ingest.
pub const WRITE_CONNECTIONS: u32 = RESERVATION_LANES as u32 + 1;

/// The calls' pool, and the writers' when `database.max_connections` leaves
/// room for both: [`WRITE_CONNECTIONS`] of it go to the writers (opened on
/// first use), the rest to calls, so identity never opens more than
/// `database.max_connections`. Below twice [`WRITE_CONNECTIONS`], and on
/// SQLite (`usher dev`, whose writers are serialised anyway), one pool
/// serves both (`None`).
pub fn split(config: &DatabaseConfig) -> (DatabaseConfig, Option<DatabaseConfig>) {
    if config.url.expose().starts_with("sqlite:") || config.max_connections < 2 * WRITE_CONNECTIONS
    {
        return (config.clone(), None);
    }
    let mut calls = config.clone();
    calls.max_connections -= WRITE_CONNECTIONS;
    calls.min_connections = calls.min_connections.min(calls.max_connections);
    let writers = DatabaseConfig {
        max_connections: WRITE_CONNECTIONS,
        min_connections: 0,
        migrate_on_start: false,
        ..config.clone()
    };
    (calls, Some(writers))
}

#[cfg(test)]
mod tests {
    use usher_kit::config::Secret;

    use super::*;

    fn config(url: &str, max: u32) -> DatabaseConfig {
        DatabaseConfig {
            url: Secret::new(url.to_owned()),
            max_connections: max,
            min_connections: 1,
            ..DatabaseConfig::default()
        }
    }

    #[test]
    fn the_writers_take_their_connections_out_of_the_pool_size() {
        let (calls, writers) = split(&config("postgres://h/db", 16));
        let writers = writers.expect("16 connections leave room for both");
        assert_eq!(calls.max_connections, 11);
        assert_eq!(writers.max_connections, 5);
        assert_eq!(calls.max_connections + writers.max_connections, 16);
        assert_eq!(writers.min_connections, 0, "opened on first use");
        assert!(!writers.migrate_on_start);
        assert_eq!(writers.url.expose(), "postgres://h/db");
    }

    #[test]
    fn a_small_pool_or_sqlite_is_not_split() {
        for (url, max) in [("postgres://h/db", 9), ("sqlite:usher.db?mode=rwc", 16)] {
            let (calls, writers) = split(&config(url, max));
            assert!(writers.is_none(), "{url} with {max}");
            assert_eq!(calls.max_connections, max);
        }
    }
}
