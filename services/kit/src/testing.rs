//! Helpers for tests that use the real servers: a fresh PostgreSQL database
//! per test, dropped afterwards, and real Redis topologies
//! ([`topologies`]). Not used by the binaries.

pub mod topologies;

use sea_orm::{ConnectionTrait, DatabaseConnection};

use crate::config::{DatabaseConfig, Secret};

/// A database created for one test on the local PostgreSQL
/// (`USHER_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432`).
#[derive(Debug)]
pub struct TestDatabase {
    /// Configuration pointing at the new database.
    pub config: DatabaseConfig,
    name: String,
    server: String,
}

impl TestDatabase {
    /// Creates `usher_test_<label>_<random>` and returns its configuration.
    pub async fn create(label: &str) -> Result<Self, sea_orm::DbErr> {
        let server = std::env::var("USHER_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("usher_test_{label}_{}", &suffix[..12]);
        let config = DatabaseConfig {
            url: Secret::new(format!("{server}/{name}")),
            max_connections: 20,
            ..DatabaseConfig::default()
        };
        crate::db::ensure_database(config.url.expose()).await?;
        Ok(Self {
            config,
            name,
            server,
        })
    }

    /// Connects, applying no migration.
    pub async fn connect(&self) -> Result<DatabaseConnection, sea_orm::DbErr> {
        crate::db::connect(&self.config).await
    }

    /// Connects and applies the migrations of `M`.
    pub async fn migrated<M: sea_orm_migration::MigratorTrait>(
        &self,
    ) -> Result<DatabaseConnection, sea_orm::DbErr> {
        crate::db::migrate::<M>(&self.config).await?;
        crate::db::connect(&self.config).await
    }

    /// Drops the database (closing other connections to it).
    pub async fn drop_database(self) -> Result<(), sea_orm::DbErr> {
        let admin = sea_orm::Database::connect(format!("{}/postgres", self.server)).await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await?;
        admin.close().await
    }
}
