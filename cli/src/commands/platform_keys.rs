//! `usher platform-keys create`: operators create the platform API keys the
//! embedding platform uses to create accounts, set subscriptions and register
//! products. Runs against the identity database and Redis with identity's
//! configuration (`--config`, `USHER_*`), like `usher-identity migrate`.
//!
//! The key is stored in identity's table (the source of truth) and its
//! snapshot written to Redis, where the gateway resolves it: without the
//! snapshot the gateway would refuse the key.

use std::{path::Path, sync::Arc};

use usher_kit::{
    clock::{Clock, SystemClock},
    redis::Redis,
    sessions::RedisSessionStore,
    tokens::TokenHasher,
};

/// Creates a platform key named `name` and prints its id and secret once.
pub async fn create(config: Option<&Path>, name: &str) -> anyhow::Result<()> {
    let config: usher_identity::Config = usher_kit::config::load(config)?;
    usher_identity::migrate(config.clone()).await?;
    let db = usher_kit::db::connect(&config.database).await?;
    let tokens = TokenHasher::from_config(&config.tokens)?;
    let sessions = RedisSessionStore::new(
        Redis::connect(&config.redis)?,
        config.sessions.clone(),
        TokenHasher::from_config(&config.tokens)?,
        Arc::new(SystemClock),
    );
    let key = usher_identity::store::api_keys::create_and_publish_platform_key(
        &db,
        &sessions,
        &tokens,
        name,
        SystemClock.now(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    db.close().await?;
    #[allow(clippy::print_stdout)]
    {
        println!("platform key {}", key.id);
        println!("secret (shown once): {}", key.secret.as_str());
    }
    Ok(())
}
