//! Sessions in process memory ([`MemorySessionStore`]) for `usher dev` and
//! tests: the same contract as the Redis store, with expiry read from the
//! injected clock and one lock making every operation atomic.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    sync::Mutex,
};

use chrono::{DateTime, Utc};
use futures::{FutureExt, future::BoxFuture};
use uuid::Uuid;

use super::{
    SessionError, SessionStore,
    config::SessionConfig,
    record::{IssuedSession, SessionMeta, SessionRecord},
    rules::{Minted, Rules, Stale, TokenEntry, reuse_detected},
    snapshot::{ApiKeySnapshot, PrincipalSnapshot, plausible_api_key},
};
use crate::{clock::SharedClock, error::ApiResult, principal::Principal, tokens::TokenHasher};

/// The in-process state of [`MemorySessionStore`], mirroring the Redis keys.
#[derive(Default)]
struct Memory {
    access: HashMap<String, TokenEntry>,
    refresh: HashMap<String, TokenEntry>,
    sessions: HashMap<Uuid, SessionRecord>,
    by_user: HashMap<Uuid, BTreeSet<Uuid>>,
    principals: HashMap<Uuid, PrincipalSnapshot>,
    /// API key snapshots by secret hash; `None` is a revocation's tombstone.
    api_keys: HashMap<String, Option<ApiKeySnapshot>>,
}

impl Memory {
    /// Drops what Redis would have expired by `now`.
    fn sweep(&mut self, now: DateTime<Utc>) {
        self.access.retain(|_, entry| entry.exp > now);
        self.refresh.retain(|_, entry| entry.exp > now);
        self.sessions.retain(|_, record| Rules::live(now, record));
        let sessions = &self.sessions;
        self.by_user.retain(|_, ids| {
            ids.retain(|id| sessions.contains_key(id));
            !ids.is_empty()
        });
    }

    fn live_session(&self, now: DateTime<Utc>, id: Uuid) -> Option<&SessionRecord> {
        self.sessions
            .get(&id)
            .filter(|record| Rules::live(now, record))
    }

    fn remove_session(&mut self, id: Uuid) -> bool {
        let Some(record) = self.sessions.remove(&id) else {
            return false;
        };
        self.access.remove(&record.access_hash);
        self.refresh.remove(&record.refresh_hash);
        if let Some(ids) = self.by_user.get_mut(&record.user_id) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_user.remove(&record.user_id);
            }
        }
        true
    }

    fn insert(&mut self, minted: &Minted) {
        let record = minted.record().clone();
        self.access
            .insert(record.access_hash.clone(), minted.access_entry());
        self.refresh
            .insert(record.refresh_hash.clone(), minted.refresh_entry());
        self.by_user
            .entry(record.user_id)
            .or_default()
            .insert(record.id);
        self.sessions.insert(record.id, record);
    }
}

/// Sessions in process memory, for `usher dev` and tests. Expiry follows the
/// injected clock; one lock makes every operation atomic.
pub struct MemorySessionStore {
    rules: Rules,
    state: Mutex<Memory>,
}

impl fmt::Debug for MemorySessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySessionStore")
            .field("config", &self.rules.config)
            .finish_non_exhaustive()
    }
}

impl MemorySessionStore {
    /// An empty store, hashing tokens with `hasher` and reading time from
    /// `clock`. `config` is expected to be validated.
    pub fn new(config: SessionConfig, hasher: TokenHasher, clock: SharedClock) -> Self {
        Self {
            rules: Rules {
                config,
                hasher,
                clock,
            },
            state: Mutex::new(Memory::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Memory> {
        // The state stays consistent across a panic: every change is made
        // after all checks, under the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn do_create(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> ApiResult<IssuedSession> {
        let minted = self.rules.start(account_id, user_id, meta)?;
        let mut state = self.state();
        state.sweep(minted.record().created_at);
        state.insert(&minted);
        Ok(minted.issued)
    }

    fn do_resolve_access(&self, access_token: &str) -> Option<SessionRecord> {
        let now = self.rules.clock.now();
        let hash = self.rules.hash_access(access_token);
        let state = self.state();
        let entry = state.access.get(&hash).filter(|entry| entry.exp > now)?;
        state.live_session(now, entry.sid).cloned()
    }

    fn do_refresh(&self, refresh_token: &str) -> Result<IssuedSession, SessionError> {
        let now = self.rules.clock.now();
        let hash = self.rules.hash_refresh(refresh_token);
        let mut state = self.state();
        let sid = state
            .refresh
            .get(&hash)
            .filter(|entry| entry.exp > now)
            .ok_or(SessionError::NotUsable)?
            .sid;
        let record = state
            .live_session(now, sid)
            .cloned()
            .ok_or(SessionError::NotUsable)?;
        if record.refresh_hash != hash {
            return match self.rules.judge_stale(now, &record, &hash) {
                Stale::Superseded => Err(SessionError::Superseded),
                Stale::Reused => {
                    state.remove_session(record.id);
                    Err(reuse_detected(&record))
                }
            };
        }
        let minted = self.rules.rotate(now, &record)?;
        state.insert(&minted);
        Ok(minted.issued)
    }

    fn do_revoke(&self, session_id: Uuid) -> bool {
        let mut state = self.state();
        state.sweep(self.rules.clock.now());
        state.remove_session(session_id)
    }

    fn do_revoke_user(&self, user_id: Uuid) -> usize {
        let mut state = self.state();
        state.sweep(self.rules.clock.now());
        let ids = state.by_user.remove(&user_id).unwrap_or_default();
        ids.into_iter()
            .filter(|id| state.remove_session(*id))
            .count()
    }

    fn do_put_api_key(&self, hash: String, snapshot: ApiKeySnapshot) -> bool {
        if snapshot
            .expire_time
            .is_some_and(|at| at <= self.rules.clock.now())
        {
            return false;
        }
        let mut state = self.state();
        match state.api_keys.get(&hash) {
            Some(None) => false,
            Some(Some(stored)) if stored.version >= snapshot.version => false,
            _ => {
                state.api_keys.insert(hash, Some(snapshot));
                true
            }
        }
    }

    fn do_get_api_key(&self, secret: &str) -> Option<Principal> {
        if !plausible_api_key(secret) {
            return None;
        }
        let hash = self.rules.hash_api_key(secret);
        let now = self.rules.clock.now();
        self.state()
            .api_keys
            .get(&hash)?
            .as_ref()?
            .principal_at(now)
    }

    fn do_delete_api_key(&self, hash: String) -> bool {
        matches!(self.state().api_keys.insert(hash, None), Some(Some(_)))
    }

    fn do_put_principal(&self, snapshot: PrincipalSnapshot) -> bool {
        let mut state = self.state();
        match state.principals.get(&snapshot.user_id) {
            Some(stored) if stored.version >= snapshot.version => false,
            _ => {
                state.principals.insert(snapshot.user_id, snapshot);
                true
            }
        }
    }
}

impl SessionStore for MemorySessionStore {
    fn create(
        &self,
        account_id: Uuid,
        user_id: Uuid,
        meta: SessionMeta,
    ) -> BoxFuture<'_, ApiResult<IssuedSession>> {
        let issued = self.do_create(account_id, user_id, meta);
        async move { issued }.boxed()
    }

    fn resolve_access<'a>(
        &'a self,
        access_token: &'a str,
    ) -> BoxFuture<'a, ApiResult<Option<SessionRecord>>> {
        let record = self.do_resolve_access(access_token);
        async move { Ok(record) }.boxed()
    }

    fn refresh<'a>(
        &'a self,
        refresh_token: &'a str,
    ) -> BoxFuture<'a, Result<IssuedSession, SessionError>> {
        let result = self.do_refresh(refresh_token);
        async move { result }.boxed()
    }

    fn get(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<Option<SessionRecord>>> {
        let now = self.rules.clock.now();
        let record = self.state().live_session(now, session_id).cloned();
        async move { Ok(record) }.boxed()
    }

    fn revoke(&self, session_id: Uuid) -> BoxFuture<'_, ApiResult<bool>> {
        let removed = self.do_revoke(session_id);
        async move { Ok(removed) }.boxed()
    }

    fn revoke_user(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<usize>> {
        let count = self.do_revoke_user(user_id);
        async move { Ok(count) }.boxed()
    }

    fn put_principal(&self, snapshot: PrincipalSnapshot) -> BoxFuture<'_, ApiResult<bool>> {
        let written = self.do_put_principal(snapshot);
        async move { Ok(written) }.boxed()
    }

    fn get_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<Option<PrincipalSnapshot>>> {
        let snapshot = self.state().principals.get(&user_id).cloned();
        async move { Ok(snapshot) }.boxed()
    }

    fn delete_principal(&self, user_id: Uuid) -> BoxFuture<'_, ApiResult<bool>> {
        let deleted = self.state().principals.remove(&user_id).is_some();
        async move { Ok(deleted) }.boxed()
    }

    fn put_api_key(
        &self,
        hash: String,
        snapshot: ApiKeySnapshot,
    ) -> BoxFuture<'_, ApiResult<bool>> {
        let written = self.do_put_api_key(hash, snapshot);
        async move { Ok(written) }.boxed()
    }

    fn get_api_key<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, ApiResult<Option<Principal>>> {
        let principal = self.do_get_api_key(secret);
        async move { Ok(principal) }.boxed()
    }

    fn delete_api_key(&self, hash: String) -> BoxFuture<'_, ApiResult<bool>> {
        let had = self.do_delete_api_key(hash);
        async move { Ok(had) }.boxed()
    }
}
