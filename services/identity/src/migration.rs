//! The identity database's migrations, applied by `usher-identity migrate`
//! (or at start with `database.migrate_on_start`).

use sea_orm_migration::{MigrationTrait, MigratorTrait};

/// Every migration of the identity database, oldest first.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            usher_kit::outbox::migration(),
            Box::new(crate::store::schema::CreateIdentitySchema),
            Box::new(crate::store::seats::CreateSeatCounter),
            Box::new(crate::store::schema::ShortSearchPendingList),
            usher_kit::outbox::notify_migration(),
            Box::new(crate::store::holders::CreateHolderCounts),
            Box::new(crate::store::schema::SearchTextStatistics),
            Box::new(crate::store::schema::CoveringNameIndex),
        ]
    }
}
