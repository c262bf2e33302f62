//! CreateInvitations as a saga over three ports (identity, the token keys,
//! the database; see [`crate::domain::ports`]), with the rules in
//! [`crate::domain::create`].
//!
//! Order of effects, chosen so that a failure at any step leaves nothing
//! half-done that matters:
//! 1. the hourly quota is taken for the candidates;
//! 2. identity reserves an INVITED user per eligible invitee (idempotent per
//!    invitation id; with a `request_id` the ids are derived from it, so a
//!    retry after a crash reserves the same users again instead of leaking
//!    seats) and answers the invitation's context (account, inviter, role
//!    and team) with it — one call to identity; a call with nobody to
//!    reserve asks for the context alone;
//! 3. the token keys are written to Redis (a key whose invitation never
//!    commits points at nothing: PostgreSQL is the guard);
//! 4. one transaction inserts the invitations, their email jobs and
//!    `invitation.created` events (outbox) and the idempotent answer.
//!
//! Compensations, best effort: if identity refuses (2), the quota taken is
//! given back; if step 3 or 4 fails, the keys written are forgotten, the
//! reserved users released (reason ROLLBACK) and the quota given back.
//! After a success, the sends of invitees not invited are given back.

use chrono::{DateTime, Utc};
use usher_kit::{
    clock::SharedClock,
    error::{ApiError, ApiResult, Reason},
    idempotency::IdempotencyKey,
    principal::Principal,
    tokens::Token,
};
use usher_proto::{
    identity::{internal::v1 as internal, v1 as identity},
    invitation::v1 as pb,
    notification::v1 as notification,
};
use uuid::Uuid;

use super::view;
use crate::{
    config::InvitationsConfig,
    domain::{
        Invitation,
        actors::{actor, this_service},
        create::{
            Batch, CreateCommand, Triage, invitation_id, link_lifetime, new_invitation, respond,
            seat_limit, triage,
        },
        events::{self, EmailContext, Links},
        ports::{DirectoryPort, RepositoryPort, TokenEntry, TokenPort},
    },
};

/// The RPC whose answers are remembered per `request_id`.
const RPC: &str = "usher.invitation.v1.InvitationService/CreateInvitations";

/// One invitation being created: its result's index, its row, its token.
type Created = (usize, Invitation, Token);

/// The create saga and what it runs on.
#[derive(Debug)]
pub struct CreateSaga<'a, D, T, R> {
    /// Identity.
    pub directory: &'a D,
    /// The token keys and the quota.
    pub tokens: &'a T,
    /// The invitation database.
    pub repository: &'a R,
    /// Where links point and how they are sealed.
    pub links: Links<'a>,
    /// The quota.
    pub rules: &'a InvitationsConfig,
    /// Time.
    pub clock: &'a SharedClock,
}

impl<D: DirectoryPort, T: TokenPort, R: RepositoryPort> CreateSaga<'_, D, T, R> {
    /// CreateInvitations by `caller`, in the call `call_id`.
    pub async fn run(
        &self,
        caller: &Principal,
        mut request: pb::CreateInvitationsRequest,
        call_id: &str,
    ) -> ApiResult<pb::CreateInvitationsResponse> {
        let account_id = caller.account()?;
        let command = CreateCommand::parse(&request)?;
        let request_id = std::mem::take(&mut request.request_id);
        let dry_run = request.dry_run;
        let idempotency = if dry_run {
            None
        } else {
            IdempotencyKey::new(caller, RPC, &request_id, &request)?
        };
        if let Some(key) = &idempotency
            && let Some(answer) = timed("replay", self.repository.replay(key)).await?
        {
            return Ok(answer);
        }

        let now = self.clock.now();
        let inviter = actor(caller);
        let mut triage = triage(&command.entries);
        let granted = if dry_run || triage.candidates.is_empty() {
            triage.candidates.len()
        } else {
            let wanted = u32::try_from(triage.candidates.len()).unwrap_or(u32::MAX);
            let granted = timed(
                "quota",
                self.tokens
                    .take_quota(account_id, wanted, self.rules.hourly_quota, now),
            )
            .await?;
            usize::try_from(granted).unwrap_or(0)
        };
        triage.limit(granted);

        let idempotent_id = idempotency.as_ref().map(|key| key.request_id.as_str());
        let ids: Vec<Uuid> = triage
            .candidates
            .iter()
            .map(|&i| invitation_id(account_id, idempotent_id, &triage.results[i].email))
            .collect();
        // Identity answers the context (account, inviter's name, role and
        // team) with the reservation; only a call with nobody to reserve
        // asks for it on its own.
        let mut reservation = internal::ReserveInviteesResponse::default();
        let context = if triage.candidates.is_empty() {
            timed(
                "context",
                self.directory.context(
                    account_id,
                    Some(inviter.clone()),
                    Some(command.role_id),
                    command.team_id,
                    call_id,
                ),
            )
            .await?
        } else {
            let reserve = internal::ReserveInviteesRequest {
                account_id: account_id.to_string(),
                inviter: Some(inviter.clone()),
                role_id: command.role_id.to_string(),
                team_id: command.team_id.map(|id| id.to_string()).unwrap_or_default(),
                products: request.products.clone(),
                metadata: request.metadata.clone(),
                invitees: triage.invitees(&ids),
                dry_run,
                locale: request.locale.clone(),
            };
            // What to release if identity's answer is lost (below).
            let asked: Vec<(String, Uuid)> = reserve
                .invitees
                .iter()
                .zip(&ids)
                .map(|(invitee, id)| (invitee.email.clone(), *id))
                .collect();
            reservation = match timed("reserve", self.directory.reserve(reserve, call_id)).await {
                Ok(answer) => answer,
                Err(err) => {
                    if outcome_unknown(&err) {
                        self.release_unanswered(account_id, &asked, call_id).await;
                    }
                    self.give_back(account_id, granted, now).await;
                    return Err(err);
                }
            };
            reservation.context.take().unwrap_or_default()
        };
        let account = context.account.clone().unwrap_or_default();
        let seats_used = if triage.candidates.is_empty() {
            account.seats_used
        } else {
            reservation.seats_used
        };
        // Named from here on: the events show who.
        let inviter = identity::Actor {
            display_name: context.inviter_display_name.clone(),
            ..inviter
        };

        let reserved = triage.apply_reservation(&ids, &reservation, dry_run)?;
        let batch = Batch {
            account_id,
            role: (command.role_id, &reservation.role_name),
            team: (command.team_id, &reservation.team_name),
            request: &request,
            inviter: &inviter,
            expire_time: now + link_lifetime(&context),
        };
        let mut created: Vec<Created> = reserved
            .into_iter()
            .map(|reserved| {
                let (token, hash) = self.tokens.generate();
                let result = &triage.results[reserved.index];
                let row = new_invitation(&batch, reserved, result, hash, now);
                (reserved.index, row, token)
            })
            .collect();
        let not_invited = granted - created.len();

        let committed = if dry_run {
            Ok(())
        } else {
            self.commit(
                &mut created,
                &mut triage,
                &inviter,
                &account,
                idempotency.as_ref(),
                seats_used,
                call_id,
            )
            .await
        };
        let response = respond(triage.results, dry_run, seats_used, seat_limit(&account));
        if let Err(err) = committed {
            self.roll_back(account_id, &created, granted, now, call_id)
                .await;
            return Err(err);
        }
        if !dry_run {
            self.give_back(account_id, not_invited, now).await;
        }
        Ok(response)
    }

    /// Writes the token keys, then the invitations, their messages and the
    /// idempotent answer in one transaction.
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        created: &mut [Created],
        triage: &mut Triage,
        inviter: &identity::Actor,
        account: &identity::Account,
        idempotency: Option<&IdempotencyKey>,
        seats_used: i32,
        call_id: &str,
    ) -> ApiResult<()> {
        let now = self.clock.now();
        let context = EmailContext {
            account_name: account.name.clone(),
            account_locale: account.default_locale.clone(),
            request_id: call_id.to_owned(),
        };
        let mut outgoing = Vec::with_capacity(created.len() * 2);
        for (_, model, token) in created.iter_mut() {
            let (job, job_id) = events::invitation_email(
                self.links,
                model,
                token,
                notification::EmailTemplate::Invitation,
                &context,
                now,
            )?;
            model.delivery_job_id = job_id;
            outgoing.push(job);
            outgoing.push(events::created(
                model,
                inviter,
                idempotency.map_or("", |key| key.request_id.as_str()),
                now,
            ));
        }
        for (i, model, _) in created.iter() {
            triage.results[*i].invitation = Some(view::invitation(model, now));
        }
        let entries: Vec<TokenEntry> = created
            .iter()
            .map(|(_, model, _)| TokenEntry::of(model))
            .collect();
        timed("tokens", self.tokens.put(&entries, now)).await?;

        let rows: Vec<Invitation> = created.iter().map(|(_, model, _)| model.clone()).collect();
        let answer = idempotency.map(|key| {
            let answer = respond(
                triage.results.clone(),
                false,
                seats_used,
                seat_limit(account),
            );
            (key, answer)
        });
        timed(
            "insert",
            self.repository.insert_created(
                rows,
                outgoing,
                answer.as_ref().map(|(key, answer)| (*key, answer)),
                now,
            ),
        )
        .await?;
        metrics::counter!("usher_invitations_created_total").increment(created.len() as u64);
        Ok(())
    }

    /// Undoes what a failed create did outside the database, best effort.
    async fn roll_back(
        &self,
        account_id: Uuid,
        created: &[Created],
        granted: usize,
        now: DateTime<Utc>,
        call_id: &str,
    ) {
        let hashes: Vec<String> = created
            .iter()
            .map(|(_, m, _)| m.token_hash.clone())
            .collect();
        self.tokens.forget(&hashes, "rolled back").await;
        let targets: Vec<(Uuid, Uuid)> =
            created.iter().map(|(_, m, _)| (m.user_id, m.id)).collect();
        if let Err(err) = self
            .directory
            .release(
                account_id,
                this_service(),
                &targets,
                internal::ReleaseReason::Rollback,
                call_id,
            )
            .await
        {
            tracing::warn!(error = %err, "rollback: reserved invitees not released");
        }
        self.give_back(account_id, granted, now).await;
    }

    /// A reservation whose answer never came (identity stopped or crashed
    /// mid-call, the connection broke, the deadline passed) may have been
    /// committed: release what it asked for, by address and invitation id
    /// (identity answers NOT_FOUND for what it never reserved). Best effort,
    /// as [`Self::roll_back`].
    async fn release_unanswered(&self, account_id: Uuid, asked: &[(String, Uuid)], call_id: &str) {
        if let Err(err) = self
            .directory
            .release_unanswered(account_id, asked, call_id)
            .await
        {
            tracing::warn!(error = %err, invitees = asked.len(), "reservation unanswered and not released");
        }
    }

    async fn give_back(&self, account_id: Uuid, count: usize, now: DateTime<Utc>) {
        give_back(self.tokens, self.rules, account_id, count, now).await;
    }
}

/// Whether a failed call to identity may still have been carried out: it
/// could not be reached or answer in time, or failed unexpectedly. A refusal
/// of the call (its input, a rule) reserved nothing.
fn outcome_unknown(err: &ApiError) -> bool {
    match err {
        ApiError::Unavailable(_) | ApiError::Internal(_) => true,
        ApiError::Rejected { reason, .. } => *reason == Reason::Unavailable,
        ApiError::InvalidArgument(_) => false,
    }
}

/// Histogram of the time each step of CreateInvitations takes, by `step`
/// (replay, context, quota, reserve, tokens, insert).
pub const STEP_SECONDS: &str = "usher_invitation_create_step_seconds";
/// The steps of [`STEP_SECONDS`].
pub const STEPS: [&str; 6] = ["replay", "context", "quota", "reserve", "tokens", "insert"];

/// Awaits `work`, recording how long it took as `step` of [`STEP_SECONDS`].
async fn timed<F: std::future::Future>(step: &'static str, work: F) -> F::Output {
    let started = std::time::Instant::now();
    let output = work.await;
    metrics::histogram!(STEP_SECONDS, "step" => step).record(started.elapsed().as_secs_f64());
    output
}

/// Gives `count` sends back to the account's hourly quota, best effort (a
/// failure is logged: the quota only runs short until the hour ends).
pub(crate) async fn give_back<T: TokenPort>(
    tokens: &T,
    rules: &InvitationsConfig,
    account_id: Uuid,
    count: usize,
    now: DateTime<Utc>,
) {
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    if let Err(err) = tokens
        .give_back_quota(account_id, count, rules.hourly_quota, now)
        .await
    {
        tracing::warn!(error = %err, "quota not given back");
    }
}

#[cfg(test)]
mod tests {
    //! The saga against fake ports: what each failure leaves behind.

    use std::sync::Mutex;

    use chrono::TimeZone;
    use prost::Message;
    use usher_kit::{
        amqp::OutgoingMessage,
        clock::ManualClock,
        db::{StoreError, StoreResult},
        error::{ApiError, Reason},
        principal::PrincipalKind,
        seal::Sealer,
    };

    use super::*;
    use crate::domain::fixtures::create_request as request;

    /// One release identity was asked for: its `(user, invitation)`
    /// targets and its reason.
    type Release = (Vec<(Uuid, Uuid)>, internal::ReleaseReason);

    /// Identity: reserves every invitee (or refuses), and remembers what
    /// it was asked.
    #[derive(Default)]
    struct FakeDirectory {
        refuse_reserve: bool,
        seat_limit: i32,
        reserved: Mutex<Vec<internal::ReserveInviteesRequest>>,
        released: Mutex<Vec<Release>>,
        released_unanswered: Mutex<Vec<Vec<(String, Uuid)>>>,
    }

    impl DirectoryPort for FakeDirectory {
        async fn context(
            &self,
            _account_id: Uuid,
            _inviter: Option<identity::Actor>,
            _role_id: Option<Uuid>,
            _team_id: Option<Uuid>,
            _request_id: &str,
        ) -> ApiResult<internal::GetInvitationContextResponse> {
            Ok(internal::GetInvitationContextResponse {
                account: Some(identity::Account {
                    name: "Acme".into(),
                    seats_used: 1,
                    subscription: Some(identity::Subscription {
                        seat_limit: self.seat_limit,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                inviter_display_name: "Olga Owner".into(),
                ..Default::default()
            })
        }

        async fn reserve(
            &self,
            request: internal::ReserveInviteesRequest,
            _request_id: &str,
        ) -> ApiResult<internal::ReserveInviteesResponse> {
            if self.refuse_reserve {
                // Asked, and no answer came back.
                self.reserved.lock().unwrap().push(request);
                return Err(ApiError::Unavailable("identity is down".into()));
            }
            // The first invitee is already a member; the others are reserved.
            let results = request
                .invitees
                .iter()
                .enumerate()
                .map(|(i, _)| internal::ReservationResult {
                    verdict: if i == 0 && request.invitees.len() > 1 {
                        internal::ReservationVerdict::AlreadyMember as i32
                    } else {
                        internal::ReservationVerdict::Reserved as i32
                    },
                    user_id: Uuid::from_u128(100 + i as u128).to_string(),
                    ..Default::default()
                })
                .collect();
            self.reserved.lock().unwrap().push(request);
            let context = self
                .context(Uuid::nil(), None, None, None, "")
                .await
                .expect("context");
            Ok(internal::ReserveInviteesResponse {
                results,
                seats_used: 3,
                role_name: "User".into(),
                context: Some(context),
                ..Default::default()
            })
        }

        async fn release(
            &self,
            _account_id: Uuid,
            actor: identity::Actor,
            targets: &[(Uuid, Uuid)],
            reason: internal::ReleaseReason,
            _request_id: &str,
        ) -> ApiResult<()> {
            assert_eq!(actor.kind(), identity::ActorKind::System);
            self.released
                .lock()
                .unwrap()
                .push((targets.to_vec(), reason));
            Ok(())
        }

        async fn release_unanswered(
            &self,
            _account_id: Uuid,
            targets: &[(String, Uuid)],
            _request_id: &str,
        ) -> ApiResult<()> {
            self.released_unanswered
                .lock()
                .unwrap()
                .push(targets.to_vec());
            Ok(())
        }
    }

    /// The token keys and an hourly quota counter.
    #[derive(Default)]
    struct FakeTokens {
        fail_put: bool,
        used: Mutex<u32>,
        keys: Mutex<Vec<String>>,
        forgotten: Mutex<Vec<String>>,
    }

    impl TokenPort for FakeTokens {
        fn generate(&self) -> (Token, String) {
            let token = Token::generate();
            let hash = format!("h:{}", token.as_str());
            (token, hash)
        }

        async fn take_quota(
            &self,
            _account: Uuid,
            wanted: u32,
            limit: u32,
            _now: DateTime<Utc>,
        ) -> StoreResult<u32> {
            let mut used = self.used.lock().unwrap();
            let granted = wanted.min(limit.saturating_sub(*used));
            *used += granted;
            Ok(granted)
        }

        async fn give_back_quota(
            &self,
            _account: Uuid,
            count: u32,
            _limit: u32,
            _now: DateTime<Utc>,
        ) -> StoreResult<()> {
            *self.used.lock().unwrap() -= count;
            Ok(())
        }

        async fn put(&self, entries: &[TokenEntry], _now: DateTime<Utc>) -> StoreResult<()> {
            if self.fail_put {
                return Err(StoreError::Unavailable("redis is down".into()));
            }
            let mut keys = self.keys.lock().unwrap();
            keys.extend(entries.iter().map(|e| e.hash.clone()));
            Ok(())
        }

        async fn forget(&self, hashes: &[String], _what: &str) {
            self.forgotten.lock().unwrap().extend_from_slice(hashes);
        }
    }

    /// The database: remembers what was inserted, or fails.
    #[derive(Default)]
    struct FakeRepository {
        fail_insert: bool,
        stored_answer: Option<Vec<u8>>,
        rows: Mutex<Vec<Invitation>>,
        outbox: Mutex<Vec<OutgoingMessage>>,
        answers: Mutex<Vec<pb::CreateInvitationsResponse>>,
    }

    impl RepositoryPort for FakeRepository {
        async fn replay<R: Message + Default>(
            &self,
            _key: &IdempotencyKey,
        ) -> ApiResult<Option<R>> {
            Ok(self
                .stored_answer
                .as_ref()
                .map(|bytes| R::decode(bytes.as_slice()).unwrap()))
        }

        async fn insert_created<R: Message>(
            &self,
            created: Vec<Invitation>,
            emit: Vec<OutgoingMessage>,
            answer: Option<(&IdempotencyKey, &R)>,
            _now: DateTime<Utc>,
        ) -> StoreResult<()> {
            if self.fail_insert {
                return Err(StoreError::Unavailable("database is down".into()));
            }
            self.rows.lock().unwrap().extend(created);
            self.outbox.lock().unwrap().extend(emit);
            let answer = answer.map(|(_, a)| {
                pb::CreateInvitationsResponse::decode(a.encode_to_vec().as_slice()).unwrap()
            });
            self.answers.lock().unwrap().extend(answer);
            Ok(())
        }
    }

    struct World {
        directory: FakeDirectory,
        tokens: FakeTokens,
        repository: FakeRepository,
        sealer: Sealer,
        rules: InvitationsConfig,
        clock: SharedClock,
    }

    impl World {
        fn new() -> Self {
            Self {
                directory: FakeDirectory {
                    seat_limit: 10,
                    ..Default::default()
                },
                tokens: FakeTokens::default(),
                repository: FakeRepository::default(),
                sealer: Sealer::new(&[3u8; 32], "k1"),
                rules: InvitationsConfig {
                    hourly_quota: 10,
                    ..InvitationsConfig::default()
                },
                clock: ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap()),
            }
        }

        fn saga(&self) -> CreateSaga<'_, FakeDirectory, FakeTokens, FakeRepository> {
            CreateSaga {
                directory: &self.directory,
                tokens: &self.tokens,
                repository: &self.repository,
                links: Links {
                    sealer: &self.sealer,
                    base: "https://usher.example",
                },
                rules: &self.rules,
                clock: &self.clock,
            }
        }

        async fn create(&self, emails: &[&str]) -> ApiResult<pb::CreateInvitationsResponse> {
            self.saga().run(&admin(), request(emails), "call-1").await
        }

        fn quota_used(&self) -> u32 {
            *self.tokens.used.lock().unwrap()
        }

        fn released(&self) -> Vec<Release> {
            self.directory.released.lock().unwrap().clone()
        }
    }

    fn admin() -> Principal {
        Principal {
            kind: PrincipalKind::User,
            account_id: Some(Uuid::from_u128(1)),
            user_id: Some(Uuid::from_u128(2)),
            ..Principal::anonymous()
        }
    }

    const EMAILS: [&str; 3] = ["ann@acme.example", "bob@acme.example", "cy@acme.example"];

    #[tokio::test]
    async fn a_create_reserves_writes_keys_then_rows_and_gives_back_the_unused_quota() {
        let world = World::new();
        let answer = world.create(&EMAILS).await.expect("created");
        assert_eq!((answer.invited_count, answer.not_invited_count), (2, 1));
        assert_eq!((answer.seats_used, answer.seat_limit), (3, 10));
        assert_eq!(
            answer.results[0].verdict(),
            pb::InviteeVerdict::AlreadyMember
        );
        let rows = world.repository.rows.lock().unwrap().clone();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].inviter_name, "Olga Owner");
        assert!(rows.iter().all(|r| !r.delivery_job_id.is_empty()));
        // One email job and one `invitation.created` per invitation.
        assert_eq!(world.repository.outbox.lock().unwrap().len(), 4);
        let keys = world.tokens.keys.lock().unwrap().clone();
        assert_eq!(
            keys,
            [rows[0].token_hash.clone(), rows[1].token_hash.clone()]
        );
        // The member's send was given back; nothing was undone.
        assert_eq!(world.quota_used(), 2);
        assert!(world.released().is_empty());
        assert!(world.tokens.forgotten.lock().unwrap().is_empty());
        assert_eq!(
            answer.results[1].invitation.as_ref().unwrap().id,
            rows[0].id.to_string()
        );
    }

    #[tokio::test]
    async fn identity_unreachable_gives_the_quota_back_and_releases_what_it_may_have_reserved() {
        let mut world = World::new();
        world.directory.refuse_reserve = true;
        let err = world.create(&EMAILS).await.expect_err("identity down");
        assert!(matches!(err, ApiError::Unavailable(_)), "{err}");
        assert_eq!(world.quota_used(), 0);
        assert!(world.tokens.keys.lock().unwrap().is_empty());
        assert!(world.repository.rows.lock().unwrap().is_empty());
        assert!(world.released().is_empty());
        // The answer was lost, not refused: every address asked for is
        // released by its invitation id, as asked.
        let asked = world.directory.reserved.lock().unwrap().clone();
        let unanswered = world.directory.released_unanswered.lock().unwrap().clone();
        assert_eq!(asked.len(), 1);
        assert_eq!(unanswered.len(), 1);
        let expected: Vec<(String, Uuid)> = asked[0]
            .invitees
            .iter()
            .map(|i| (i.email.clone(), i.invitation_id.parse().unwrap()))
            .collect();
        assert_eq!(unanswered[0], expected);
        assert_eq!(expected.len(), EMAILS.len());
    }

    #[test]
    fn only_a_failure_whose_outcome_is_unknown_releases() {
        assert!(outcome_unknown(&ApiError::Unavailable("down".into())));
        assert!(outcome_unknown(&ApiError::Internal(anyhow::anyhow!("bug"))));
        assert!(!outcome_unknown(&ApiError::invalid("role_id", "unknown")));
        assert!(!outcome_unknown(&ApiError::rejected(
            Reason::NotFound,
            "no such role"
        )));
    }

    #[tokio::test]
    async fn the_token_store_failing_releases_the_reserved_users() {
        let mut world = World::new();
        world.tokens.fail_put = true;
        let err = world.create(&EMAILS).await.expect_err("redis down");
        assert!(matches!(err, ApiError::Unavailable(_)), "{err}");
        let released = world.released();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].1, internal::ReleaseReason::Rollback);
        let users: Vec<Uuid> = released[0].0.iter().map(|(user, _)| *user).collect();
        assert_eq!(users, [Uuid::from_u128(101), Uuid::from_u128(102)]);
        assert_eq!(world.tokens.forgotten.lock().unwrap().len(), 2);
        assert_eq!(world.quota_used(), 0, "every send given back");
        assert!(world.repository.rows.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_database_failing_forgets_the_keys_and_releases_the_users() {
        let mut world = World::new();
        world.repository.fail_insert = true;
        let err = world.create(&EMAILS).await.expect_err("database down");
        assert!(matches!(err, ApiError::Unavailable(_)), "{err}");
        let written = world.tokens.keys.lock().unwrap().clone();
        assert_eq!(written.len(), 2);
        assert_eq!(*world.tokens.forgotten.lock().unwrap(), written);
        let released = world.released();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].0.len(), 2);
        assert_eq!(released[0].1, internal::ReleaseReason::Rollback);
        assert_eq!(world.quota_used(), 0);
    }

    #[tokio::test]
    async fn the_quota_invites_in_request_order() {
        let mut world = World::new();
        world.rules.hourly_quota = 1;
        let answer = world
            .create(&["ann@acme.example", "bob@acme.example"])
            .await
            .unwrap();
        assert_eq!(answer.results[0].verdict(), pb::InviteeVerdict::Invited);
        assert_eq!(
            answer.results[1].verdict(),
            pb::InviteeVerdict::QuotaExceeded
        );
        let reserved = world.directory.reserved.lock().unwrap().clone();
        assert_eq!(
            reserved[0].invitees.len(),
            1,
            "only the granted are reserved"
        );
        assert_eq!(world.quota_used(), 1);
    }

    #[tokio::test]
    async fn a_dry_run_takes_no_quota_and_writes_nothing() {
        let world = World::new();
        let mut dry = request(&EMAILS);
        dry.dry_run = true;
        dry.request_id = "r-1".into();
        let answer = world.saga().run(&admin(), dry, "call-1").await.unwrap();
        assert!(answer.dry_run);
        assert_eq!(answer.invited_count, 2);
        assert!(world.directory.reserved.lock().unwrap()[0].dry_run);
        assert_eq!(world.quota_used(), 0);
        assert!(world.tokens.keys.lock().unwrap().is_empty());
        assert!(world.repository.rows.lock().unwrap().is_empty());
        assert!(world.repository.answers.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_idempotent_call_remembers_its_answer_and_a_retry_replays_it() {
        let world = World::new();
        let mut first = request(&EMAILS);
        first.request_id = "r-1".into();
        let answer = world
            .saga()
            .run(&admin(), first.clone(), "call-1")
            .await
            .unwrap();
        let remembered = world.repository.answers.lock().unwrap().clone();
        assert_eq!(remembered, std::slice::from_ref(&answer));

        let mut retried = World::new();
        retried.repository.stored_answer = Some(answer.encode_to_vec());
        let replayed = retried.saga().run(&admin(), first, "call-2").await.unwrap();
        assert_eq!(replayed, answer);
        assert!(retried.directory.reserved.lock().unwrap().is_empty());
        assert_eq!(retried.quota_used(), 0);
    }

    #[tokio::test]
    async fn bad_requests_and_callers_without_an_account_touch_nothing() {
        let world = World::new();
        let err = world
            .saga()
            .run(&Principal::anonymous(), request(&EMAILS), "call-1")
            .await
            .expect_err("no account");
        assert_ne!(err.reason(), Reason::Internal);
        let mut no_role = request(&EMAILS);
        no_role.role_id.clear();
        let err = world
            .saga()
            .run(&admin(), no_role, "call-1")
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument(_)));
        assert!(world.directory.reserved.lock().unwrap().is_empty());
        assert_eq!(world.quota_used(), 0);
    }
}
