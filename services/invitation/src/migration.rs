//! The invitation database's migrations, applied by `usher-invitation migrate`
//! (or at start with `database.migrate_on_start`).

use sea_orm_migration::{MigrationTrait, MigratorTrait};

/// Every migration of the invitation database, oldest first.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            usher_kit::outbox::migration(),
            Box::new(crate::store::schema::CreateInvitationSchema),
            usher_kit::outbox::notify_migration(),
            Box::new(crate::store::schema::IndexPendingTokens),
        ]
    }
}
