//! OpenTelemetry traces across every hop: with `telemetry.otlp_endpoint` set
//! on the four binaries, one CreateInvitations through the gateway is one
//! trace — the gateway's call, invitation's, identity's reservation, and the
//! notification service's email send of the job published through the
//! outbox and RabbitMQ — received by an OTLP collector (a tonic server of the
//! OTLP trace service, here in the test).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use usher_proto::{
    identity::v1::{
        UpdateAccountRequest, account_service_client::AccountServiceClient, sign_in_request::Login,
    },
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
};

use crate::{
    harness::{OWNER_PASSWORD, bearer, create_account, role_id, sign_in},
    journey::MailStack,
};

/// Sends `request` as part of the trace `trace_id`, from the caller's span
/// `span` (W3C traceparent, sampled).
fn with_traceparent<T>(request: &mut tonic::Request<T>, trace_id: &str, span: &str) {
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{span}-01").parse().expect("ascii"),
    );
}

/// One received span: the service that sent it, its name, ids and parent.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// Its `method` attribute (an RPC's path), or empty.
    method: String,
}

/// An OTLP trace collector keeping every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .map(|r| attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        method: attribute(&span.attributes, "method"),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The string value of the attribute `key`, or empty.
fn attribute(attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    /// Serves the collector on a loopback port; returns its `http://` URL.
    async fn start(&self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let service = TraceServiceServer::new(self.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        (url, task)
    }

    fn spans_of(&self, trace_id: &str) -> Vec<Received> {
        self.spans
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

#[tokio::test]
async fn one_invitation_is_one_trace_from_the_gateway_to_the_smtp_send() {
    let collector = Collector::default();
    let (endpoint, _server) = collector.start().await;
    // Spans leave every 200 ms instead of every 5 s (the SDK's default).
    let traced = |binary: &'static str| {
        [
            (binary, "USHER_TELEMETRY__OTLP_ENDPOINT", endpoint.clone()),
            (binary, "OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        ]
    };
    let services: Vec<_> = ["usher-identity", "usher-invitation", "usher-notification"]
        .into_iter()
        .flat_map(traced)
        .collect();
    let stack = MailStack::start_configured(
        &services,
        &[
            ("USHER_TELEMETRY__OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
    let slug = format!("traced-{}", stack.isolation.id);
    create_account(
        &stack.identity,
        &slug,
        "Traced Co",
        "owner@traced.example",
        "Oona Owner",
        10,
    )
    .await;
    let admin = sign_in(
        &stack.gateway,
        &slug,
        Login::Email("owner@traced.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    let role = role_id(&stack.gateway, &admin, "User").await;

    // The caller starts the trace (W3C traceparent, sampled).
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = "00f067aa0ba902b7";
    let mut request = bearer(
        &admin,
        pb::CreateInvitationsRequest {
            raw_text: "ivy@traced.example".into(),
            role_id: role,
            ..Default::default()
        },
    );
    with_traceparent(&mut request, &trace_id, caller_span);
    let created = InvitationServiceClient::new(stack.gateway.channel())
        .create_invitations(request)
        .await
        .expect("created")
        .into_inner();
    assert_eq!(created.invited_count, 1, "{created:?}");
    stack.email_to("ivy@traced.example").await;

    // Every binary's part of it arrives, as one connected trace.
    let wanted = [
        ("usher-gateway", "rpc"),
        ("usher-invitation", "rpc"),
        ("usher-identity", "rpc"),
        ("usher-invitation", "amqp.publish"),
        ("usher-invitation", "redis"),
        ("usher-invitation", "batch"),
        ("usher-invitation", "db.transaction"),
        ("usher-identity", "batch"),
        ("usher-identity", "db.transaction"),
        ("usher-notification", "email.send"),
    ];
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = collector.spans_of(&trace_id);
        if wanted.iter().all(|(service, name)| {
            spans
                .iter()
                .any(|s| s.service == *service && s.name == *name)
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Probes are not traced (the stack was waited for with health checks).
    let all = collector.spans.lock().expect("lock").clone();
    assert!(
        all.iter().all(|s| !s.method.starts_with("/grpc.health")),
        "health checks exported: {all:#?}"
    );
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for (service, name) in wanted {
        assert!(
            spans.iter().any(|s| s.service == service && s.name == name),
            "no {name} span from {service} in the trace: {spans:#?}"
        );
    }
    // Each span's parent is the caller's span or another span of the trace,
    // and the chain goes gateway -> invitation -> identity, and invitation
    // -> the email send.
    for span in &spans {
        assert!(
            span.parent_span_id == caller_span || by_id.contains_key(span.parent_span_id.as_str()),
            "{span:?} hangs off the trace: {spans:#?}"
        );
    }
    let parent_service = |span: &Received| {
        by_id
            .get(span.parent_span_id.as_str())
            .map(|p| p.service.clone())
            .unwrap_or_else(|| "the caller".to_owned())
    };
    let gateway = spans
        .iter()
        .find(|s| s.service == "usher-gateway" && s.name == "rpc")
        .expect("gateway span");
    assert_eq!(parent_service(gateway), "the caller");
    for (service, name, parent) in [
        ("usher-invitation", "rpc", "usher-gateway"),
        ("usher-identity", "rpc", "usher-invitation"),
        ("usher-invitation", "amqp.publish", "usher-invitation"),
        ("usher-invitation", "redis", "usher-invitation"),
        ("usher-invitation", "batch", "usher-invitation"),
        ("usher-invitation", "db.transaction", "usher-invitation"),
        ("usher-identity", "batch", "usher-identity"),
        ("usher-identity", "db.transaction", "usher-identity"),
        ("usher-notification", "email.send", "usher-invitation"),
    ] {
        let span = spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .expect("present");
        assert_eq!(parent_service(span), parent, "{span:?} in {spans:#?}");
    }

    // A call whose transaction runs inside it (UpdateAccount): the
    // transaction is a `db.transaction` span of identity's `rpc` span.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let mut request = bearer(
        &admin,
        UpdateAccountRequest {
            invitation_lifetime: Some(prost_types::Duration {
                seconds: 7_200,
                nanos: 0,
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["invitation_lifetime".into()],
            }),
            ..Default::default()
        },
    );
    with_traceparent(&mut request, &trace_id, caller_span);
    AccountServiceClient::new(stack.gateway.channel())
        .update_account(request)
        .await
        .expect("updated");
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = collector.spans_of(&trace_id);
        if spans.iter().any(|s| s.name == "db.transaction") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let transaction = spans
        .iter()
        .find(|s| s.service == "usher-identity" && s.name == "db.transaction")
        .unwrap_or_else(|| panic!("no db.transaction span from identity: {spans:#?}"));
    let parent = spans
        .iter()
        .find(|s| s.span_id == transaction.parent_span_id)
        .expect("the transaction's parent is in the trace");
    assert_eq!(
        (parent.service.as_str(), parent.name.as_str()),
        ("usher-identity", "rpc"),
        "{spans:#?}"
    );
}
