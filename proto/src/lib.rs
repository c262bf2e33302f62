//! Usher's protobuf contracts: messages, tonic clients and servers for every
//! package under `proto/usher/`, the compiled file descriptor set (for gRPC
//! reflection and the gateway) and the access rule of every RPC.

/// Generated code: lints that the generator does not satisfy are silenced here,
/// never in hand-written code.
macro_rules! generated {
    ($name:literal) => {
        tonic::include_proto!($name);
    };
}

/// `usher.auth.v1`: the `rule` method option.
pub mod auth {
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_docs,
        missing_debug_implementations
    )]
    pub mod v1 {
        generated!("usher.auth.v1");
    }
}

/// `usher.identity.v1` and the internal `usher.identity.internal.v1`.
pub mod identity {
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_docs,
        missing_debug_implementations
    )]
    pub mod v1 {
        generated!("usher.identity.v1");
    }
    /// RPCs only other Usher services may call; never routed by the gateway.
    pub mod internal {
        #[allow(
            clippy::all,
            clippy::pedantic,
            missing_docs,
            missing_debug_implementations
        )]
        pub mod v1 {
            generated!("usher.identity.internal.v1");
        }
    }
}

/// `usher.invitation.v1`.
pub mod invitation {
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_docs,
        missing_debug_implementations
    )]
    pub mod v1 {
        generated!("usher.invitation.v1");
    }
}

/// `usher.notification.v1`: email jobs carried on the queue and the delivery API.
pub mod notification {
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_docs,
        missing_debug_implementations
    )]
    pub mod v1 {
        generated!("usher.notification.v1");
    }
}

/// `usher.events.v1`: domain events published on the `usher.events` exchange.
pub mod events {
    #[allow(
        clippy::all,
        clippy::pedantic,
        missing_docs,
        missing_debug_implementations
    )]
    pub mod v1 {
        generated!("usher.events.v1");
    }
}

pub mod policy;

/// The encoded `google.protobuf.FileDescriptorSet` of every Usher proto file
/// (and their imports), for reflection and for the gateway's policy table.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/usher_descriptor.bin"));
