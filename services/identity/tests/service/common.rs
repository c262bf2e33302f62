//! Helpers several areas of the service tests share: reading the error
//! details of a failed call, and a started service with an account made by
//! CreateAccount (with its owner and built-in roles).

use std::sync::Arc;

use chrono::DateTime;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tonic::{Response, Status};
use tonic_types::StatusExt;
use usher_identity::store::entities::role;
use usher_identity::testing::{
    TestIdentity, admin_permissions, member, new_account_request, platform, request,
};
use usher_kit::{clock::ManualClock, principal::Principal};
use usher_proto::identity::v1::account_service_server::AccountService;
use uuid::Uuid;

/// The `ErrorInfo.reason` of a failed call (empty when it has none).
pub fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// The fields of the `BadRequest` of a failed call.
pub fn fields(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|f| f.field.clone()).collect())
        .unwrap_or_default()
}

/// The error of a call that must fail with `expected`.
pub fn refused<T: std::fmt::Debug>(result: Result<Response<T>, Status>, expected: &str) -> Status {
    let status = result.expect_err(expected);
    assert_eq!(reason(&status), expected, "{status:?}");
    status
}

/// The error of a call that must fail with INVALID_ARGUMENT on `field`.
pub fn invalid<T: std::fmt::Debug>(result: Result<Response<T>, Status>, field: &str) {
    let status = refused(result, "INVALID_ARGUMENT");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        fields(&status).iter().any(|f| f == field),
        "{field} not in {status:?}"
    );
}

/// A started service with a manual clock.
pub async fn start() -> (TestIdentity, Arc<ManualClock>) {
    let clock = ManualClock::new(DateTime::from_timestamp(1_900_000_000, 0).expect("valid"));
    (TestIdentity::start(clock.clone()).await, clock)
}

/// An account made by CreateAccount, with its owner.
#[derive(Clone, Debug)]
pub struct Tenant {
    /// The account.
    pub account: Uuid,
    /// Its owner.
    pub owner: Uuid,
    /// The owner as a caller, holding every catalogue permission.
    pub admin: Principal,
    /// Its built-in Admin role.
    pub admin_role: Uuid,
    /// Its built-in User role.
    pub user_role: Uuid,
}

/// A new account of 50 seats with `products` enabled.
pub async fn tenant(test: &TestIdentity, products: &[&str]) -> Tenant {
    let mut message = new_account_request(50);
    message.products = products.iter().map(|p| (*p).to_owned()).collect();
    let created = AccountService::create_account(&test.api, request(&platform(), message))
        .await
        .expect("account")
        .into_inner();
    let account = Uuid::parse_str(&created.account.expect("account").id).expect("uuid");
    let owner = Uuid::parse_str(&created.owner.expect("owner").id).expect("uuid");
    let roles = role::Entity::find()
        .filter(role::Column::AccountId.eq(account))
        .all(&test.state.db)
        .await
        .expect("roles");
    let id_of = |name: &str| {
        roles
            .iter()
            .find(|r| r.name == name)
            .expect("built-in role")
            .id
    };
    Tenant {
        account,
        owner,
        admin: member(account, owner, &admin_permissions()),
        admin_role: id_of("Admin"),
        user_role: id_of("User"),
    }
}
