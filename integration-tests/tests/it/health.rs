//! Foundation: every binary starts bare against the local servers, answers
//! health and reflection, exposes metrics, reports NOT_SERVING while its
//! database is unreachable (liveness stays SERVING) and recovers; services
//! refuse calls that carry no valid principal assertion.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use usher_proto::identity::v1::{GetAccountRequest, account_service_client::AccountServiceClient};

use crate::{
    harness::{Isolation, POSTGRES, Service, Stack, service_env},
    proxy::Proxy,
};

const STARTUP: Duration = Duration::from_secs(60);

async fn reflected_services(service: &Service) -> Vec<String> {
    let mut client = ServerReflectionClient::new(service.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

pub async fn scrape(metrics: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(metrics)
        .await
        .expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

#[tokio::test]
async fn all_four_binaries_reach_serving_with_reflection_and_metrics() {
    let stack = Stack::start();
    let expectations: [(&Service, &str); 4] = [
        (&stack.identity, "usher.identity.v1.UserService"),
        (&stack.invitation, "usher.invitation.v1.InvitationService"),
        (
            &stack.notification,
            "usher.notification.v1.NotificationService",
        ),
        (&stack.gateway, "usher.invitation.v1.InvitationService"),
    ];
    for (service, name) in expectations {
        service
            .wait_for(name, ServingStatus::Serving, STARTUP)
            .await;
        assert_eq!(
            service.health("").await,
            Some(ServingStatus::Serving),
            "{} liveness",
            service.name
        );
        let listed = reflected_services(service).await;
        assert!(
            listed.iter().any(|s| s == name),
            "{} lists {listed:?}",
            service.name
        );
        assert!(
            listed.iter().any(|s| s == "grpc.health.v1.Health"),
            "{} lists {listed:?}",
            service.name
        );
        let metrics = scrape(service.metrics).await;
        assert!(
            metrics.starts_with("HTTP/1.1 200"),
            "{}: {metrics}",
            service.name
        );
        assert!(
            metrics.contains("usher_ready 1"),
            "{} metrics:\n{metrics}",
            service.name
        );
    }
    // Identity also serves the internal directory, which the gateway never lists.
    assert!(
        reflected_services(&stack.identity)
            .await
            .iter()
            .any(|s| s == "usher.identity.internal.v1.DirectoryService")
    );
    assert!(
        !reflected_services(&stack.gateway)
            .await
            .iter()
            .any(|s| s.contains(".internal."))
    );

    for service in [
        stack.identity,
        stack.invitation,
        stack.notification,
        stack.gateway,
    ] {
        let name = service.name;
        let status = service.terminate().await;
        assert!(
            status.success(),
            "{name} exits cleanly on SIGTERM: {status:?}"
        );
    }
}

#[tokio::test]
async fn a_service_whose_database_is_unreachable_reports_not_serving_and_recovers() {
    let mut isolation = Isolation::new();
    let proxy = Proxy::start(POSTGRES.parse().expect("addr")).await;
    let env = service_env(&mut isolation, "identity", &proxy.addr().to_string());
    let identity = Service::start("usher-identity", &env);
    let name = "usher.identity.v1.AccountService";
    identity
        .wait_for(name, ServingStatus::Serving, STARTUP)
        .await;

    proxy.cut();
    identity
        .wait_for(name, ServingStatus::NotServing, Duration::from_secs(10))
        .await;
    assert_eq!(
        identity.health("").await,
        Some(ServingStatus::Serving),
        "liveness never depends on the database"
    );

    proxy.heal();
    identity
        .wait_for(name, ServingStatus::Serving, Duration::from_secs(15))
        .await;
    drop(identity);
    drop(isolation);
}

#[tokio::test]
async fn services_refuse_calls_without_a_valid_principal_assertion() {
    let mut isolation = Isolation::new();
    let identity = Service::start(
        "usher-identity",
        &service_env(&mut isolation, "identity", POSTGRES),
    );
    identity.wait_for("", ServingStatus::Serving, STARTUP).await;
    let mut client = AccountServiceClient::new(identity.channel());

    let status = client
        .get_account(GetAccountRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "no assertion: {status:?}"
    );

    let mut forged = tonic::Request::new(GetAccountRequest::default());
    forged.metadata_mut().insert(
        "x-usher-assertion",
        "eyJpc3MiOiJ1c2hlci1nYXRld2F5In0.AAAA"
            .parse()
            .expect("ascii"),
    );
    forged.metadata_mut().insert(
        "x-usher-account-id",
        "00000000-0000-0000-0000-000000000001"
            .parse()
            .expect("ascii"),
    );
    let status = client.get_account(forged).await.expect_err("refused");
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "forged assertion: {status:?}"
    );
}

/// The metrics docs/operations.md lists, with the binaries serving each
/// (`all`, or names such as `identity`).
fn documented_metrics() -> Vec<(String, Vec<String>)> {
    let operations = include_str!("../../../docs/operations.md");
    let section = operations
        .split("\n## Metrics\n")
        .nth(1)
        .expect("docs/operations.md has a Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let metrics: Vec<(String, Vec<String>)> = section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix("`usher_")?;
            let name = format!("usher_{}", name.split(['{', '`']).next()?);
            let binaries = cells
                .get(2)?
                .split(',')
                .map(|b| b.trim().to_owned())
                .collect();
            Some((name, binaries))
        })
        .collect();
    assert!(metrics.len() >= 10, "the table parsed: {metrics:?}");
    metrics
}

#[tokio::test]
async fn every_documented_metric_is_served_right_after_start() {
    let documented = documented_metrics();
    let stack = Stack::start();
    let binaries: [(&Service, &str, &str); 4] = [
        (&stack.identity, "identity", "usher.identity.v1.UserService"),
        (
            &stack.invitation,
            "invitation",
            "usher.invitation.v1.InvitationService",
        ),
        (
            &stack.notification,
            "notification",
            "usher.notification.v1.NotificationService",
        ),
        (&stack.gateway, "gateway", "usher.identity.v1.UserService"),
    ];
    for (service, short, name) in binaries {
        service
            .wait_for(name, ServingStatus::Serving, STARTUP)
            .await;
        let metrics = scrape(service.metrics).await;
        let mut expected = 0;
        for (metric, served_by) in &documented {
            if !served_by.iter().any(|b| b == "all" || b == short) {
                continue;
            }
            expected += 1;
            assert!(
                metrics.contains(&format!("# TYPE {metric} ")),
                "{} does not serve {metric} right after start:\n{metrics}",
                service.name
            );
        }
        assert!(expected >= 4, "{short}: {expected} metrics checked");
        assert!(
            metrics.contains("usher_ready 1"),
            "{}:\n{metrics}",
            service.name
        );
        // The broker's gauge is recorded, and up once SERVING.
        if short != "gateway" {
            let connected = format!("usher_amqp_connected{{connection=\"{}\"}} 1", service.name);
            assert!(
                metrics.contains(&connected),
                "{}: no {connected}:\n{metrics}",
                service.name
            );
        }
    }
    // And the other way round: every usher_* metric served is documented.
    for (service, _, _) in binaries {
        let metrics = scrape(service.metrics).await;
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let metric = rest.split(' ').next().unwrap_or_default();
            if metric.starts_with("usher_") {
                assert!(
                    documented.iter().any(|(name, _)| name == metric),
                    "{} serves {metric}, which docs/operations.md does not list",
                    service.name
                );
            }
        }
    }
}
