//! The RPCs the scenarios make, through the gateway (bearer token) or
//! straight to a service (a principal assertion signed with the development
//! key, as the gateway would sign it).

use std::sync::Arc;

use tonic::{Request, Status, transport::Channel};
use usher_kit::{
    clock::{Clock, SystemClock},
    principal::{ASSERTION_HEADER, AssertionConfig, AssertionSigner, Principal, PrincipalKind},
};
use usher_proto::{
    identity::v1::{
        CreateAccountRequest, ListRolesRequest, ListUsersRequest, SignInRequest,
        account_service_client::AccountServiceClient, auth_service_client::AuthServiceClient,
        role_service_client::RoleServiceClient, sign_in_request::Login,
        user_service_client::UserServiceClient,
    },
    invitation::v1::{
        AcceptInvitationRequest, CreateInvitationsRequest, CreateInvitationsResponse, InviteeInput,
        invitation_service_client::InvitationServiceClient,
    },
};

/// Every account owner's password.
pub const OWNER_PASSWORD: &str = "correct horse battery";

/// Round-robins calls over a few HTTP/2 connections.
#[derive(Clone, Debug)]
pub struct Pool {
    channels: Arc<Vec<Channel>>,
}

impl Pool {
    /// `n` lazily connected channels to `addr`.
    pub fn new(addr: std::net::SocketAddr, n: usize) -> Self {
        Self {
            channels: Arc::new(
                (0..n.max(1))
                    .map(|_| crate::launcher::channel(addr))
                    .collect(),
            ),
        }
    }

    /// The channel for call `seq`.
    pub fn get(&self, seq: u64) -> Channel {
        let i = usize::try_from(seq).unwrap_or(0) % self.channels.len();
        self.channels[i].clone()
    }
}

/// Signs principal assertions for direct calls.
#[derive(Clone, Debug)]
pub struct Signer {
    signer: AssertionSigner,
    /// The principal every direct call is made as.
    pub principal: Principal,
}

impl Signer {
    /// Signs as the gateway would for `principal`, with the development key
    /// the binaries trust when none is configured.
    pub fn new(principal: Principal) -> anyhow::Result<Self> {
        Ok(Self {
            signer: AssertionConfig::default().signer("usher-gateway")?,
            principal,
        })
    }

    /// `message` carrying an assertion for `path`.
    pub fn request<T>(&self, path: &str, message: T) -> Request<T> {
        let token = self
            .signer
            .sign(&self.principal, path, None, SystemClock.now());
        let mut request = Request::new(message);
        if let Ok(value) = token.parse() {
            request.metadata_mut().insert(ASSERTION_HEADER, value);
        }
        request
    }
}

/// The embedding platform's back end.
pub fn platform() -> Principal {
    Principal {
        kind: PrincipalKind::Platform,
        credential_id: Some("bench-platform".into()),
        ..Principal::anonymous()
    }
}

/// An admin of `account` (user `user`) holding every permission.
pub fn admin(account: uuid::Uuid, user: uuid::Uuid) -> Principal {
    Principal {
        kind: PrincipalKind::User,
        account_id: Some(account),
        user_id: Some(user),
        credential_id: Some("bench-session".into()),
        permissions: [
            "users.read",
            "users.invite",
            "users.manage",
            "roles.manage",
            "teams.manage",
            "account.manage",
            "audit.read",
        ]
        .map(String::from)
        .to_vec(),
        service: None,
        password_change_required: false,
    }
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Creates an account at identity as the platform; returns (account id,
/// owner id).
pub async fn create_account(
    identity: Channel,
    slug: &str,
    owner_email: &str,
    seats: i32,
) -> anyhow::Result<(uuid::Uuid, uuid::Uuid)> {
    let signer = Signer::new(platform())?;
    let created = AccountServiceClient::new(identity)
        .create_account(signer.request(
            "/usher.identity.v1.AccountService/CreateAccount",
            CreateAccountRequest {
                name: format!("Bench {slug}"),
                slug: slug.into(),
                owner_email: owner_email.into(),
                owner_display_name: "Bench Owner".into(),
                owner_password: OWNER_PASSWORD.into(),
                seat_limit: seats,
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    let account = created.account.map(|a| a.id).unwrap_or_default().parse()?;
    let owner = created.owner.map(|o| o.id).unwrap_or_default().parse()?;
    Ok((account, owner))
}

/// Signs in; returns the access token.
pub async fn sign_in(
    channel: Channel,
    slug: &str,
    email: &str,
    password: &str,
) -> Result<String, Status> {
    let answer = AuthServiceClient::new(channel)
        .sign_in(SignInRequest {
            account_slug: slug.into(),
            login: Some(Login::Email(email.into())),
            password: password.into(),
        })
        .await?
        .into_inner();
    answer
        .session
        .map(|s| s.access_token)
        .ok_or_else(|| Status::internal("no session"))
}

/// The id of role `name`, listed through the gateway.
pub async fn role_id(gateway: Channel, token: &str, name: &str) -> anyhow::Result<String> {
    RoleServiceClient::new(gateway)
        .list_roles(bearer(token, ListRolesRequest::default()))
        .await?
        .into_inner()
        .roles
        .into_iter()
        .find(|r| r.name == name)
        .map(|r| r.id)
        .ok_or_else(|| anyhow::anyhow!("no role {name}"))
}

/// Invitees `first..first + n` of batch `tag`.
pub fn invitees(tag: &str, first: u64, n: u64) -> Vec<InviteeInput> {
    (first..first + n)
        .map(|k| InviteeInput {
            email: invitee_email(tag, k),
            display_name: format!("Invitee {tag} {k}"),
        })
        .collect()
}

/// The address of invitee `k` of batch `tag`.
pub fn invitee_email(tag: &str, k: u64) -> String {
    format!("{tag}-{k}@bench.example")
}

/// How a create call is sent.
#[derive(Clone, Debug)]
pub enum Via {
    /// Through the gateway with a session token.
    Gateway(String),
    /// Straight to the invitation service, signed.
    Direct(Box<Signer>),
}

/// Creates invitations; fails with `ABORTED` when fewer than all were
/// invited (a verdict other than INVITED).
pub async fn create_invitations(
    channel: Channel,
    via: &Via,
    role_id: &str,
    invitees: Vec<InviteeInput>,
) -> Result<CreateInvitationsResponse, Status> {
    let wanted = invitees.len();
    let message = CreateInvitationsRequest {
        invitees,
        role_id: role_id.to_owned(),
        ..Default::default()
    };
    let request = match via {
        Via::Gateway(token) => bearer(token, message),
        Via::Direct(signer) => signer.request(
            "/usher.invitation.v1.InvitationService/CreateInvitations",
            message,
        ),
    };
    let answer = InvitationServiceClient::new(channel)
        .create_invitations(request)
        .await?
        .into_inner();
    if usize::try_from(answer.invited_count).unwrap_or(0) != wanted {
        let reason = answer
            .results
            .iter()
            .find(|r| !r.reason.is_empty())
            .map(|r| r.reason.clone())
            .unwrap_or_default();
        return Err(Status::aborted(format!(
            "{} of {wanted} invited: {reason}",
            answer.invited_count
        )));
    }
    Ok(answer)
}

/// Accepts the invitation behind `token` through the gateway.
pub async fn accept(channel: Channel, token: &str, password: &str) -> Result<(), Status> {
    InvitationServiceClient::new(channel)
        .accept_invitation(AcceptInvitationRequest {
            token: token.to_owned(),
            display_name: "Accepted Invitee".into(),
            password: password.to_owned(),
            locale: String::new(),
        })
        .await
        .map(|_| ())
}

/// ListRoles, a small database-bound read of identity.
pub async fn list_roles(channel: Channel, via: &Via) -> Result<(), Status> {
    let request = match via {
        Via::Gateway(token) => bearer(token, ListRolesRequest::default()),
        Via::Direct(signer) => signer.request(
            "/usher.identity.v1.RoleService/ListRoles",
            ListRolesRequest::default(),
        ),
    };
    RoleServiceClient::new(channel)
        .list_roles(request)
        .await
        .map(|_| ())
}

/// ListUsers through the gateway; returns (users on the page, next token).
pub async fn list_users(
    channel: Channel,
    token: &str,
    page_token: &str,
    query: &str,
) -> Result<(usize, String), Status> {
    let answer = UserServiceClient::new(channel)
        .list_users(bearer(
            token,
            ListUsersRequest {
                page_size: 50,
                page_token: page_token.to_owned(),
                query: query.to_owned(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    Ok((answer.users.len(), answer.next_page_token))
}
