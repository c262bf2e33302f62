//! `usher-identity [serve|migrate|check-config|health] [--config FILE]`.

use std::process::ExitCode;

/// jemalloc, configured at build time (`.cargo/config.toml`): one arena,
/// freed pages given back to the system at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    usher_kit::cli::main::<usher_identity::Config, _, _, _, _>(
        usher_identity::run,
        usher_identity::migrate,
    )
    .await
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use tikv_jemalloc_ctl::{Access, AsName};

    /// The configuration `.cargo/config.toml` bakes into jemalloc, which
    /// bounds identity's peak memory under load (bench/README.md).
    #[test]
    fn the_allocator_keeps_one_arena_and_gives_freed_pages_back_at_once() {
        assert_eq!(tikv_jemalloc_ctl::opt::narenas::read().expect("narenas"), 1);
        for option in [&b"opt.dirty_decay_ms\0"[..], &b"opt.muzzy_decay_ms\0"[..]] {
            // jemalloc's ssize_t.
            let decay: isize = option.name().read().expect("decay");
            assert_eq!(decay, 0, "{}", String::from_utf8_lossy(option));
        }
    }
}
