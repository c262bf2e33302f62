//! usher-bench: measures Usher against floors measured in the same run and
//! the goals of PERFORMANCE.md, and writes the results table (Markdown and
//! JSON) and a chart (SVG). See bench/README.md.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

mod calls;
mod floors;
mod launcher;
mod load;
mod report;
#[macro_use]
mod run;
mod sink;
mod stats;

/// Benchmarks the release binaries of Usher on this machine.
#[derive(Debug, Parser)]
#[command(name = "usher-bench", version)]
struct Args {
    /// Smaller sizes and shorter runs (a couple of minutes).
    #[arg(long)]
    quick: bool,
    /// Where latest.md, latest.json and chart.svg are written.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Where the service binaries are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the services' logs go (default: `<out>/logs`, not committed).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// A README whose results section (between the `results:start` and
    /// `results:end` comments) is replaced with the new table.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Only the invitation-creation scenarios (floors, steady, sequential,
    /// 32 accounts, bulks, email drain), for profiling the write path; its
    /// results never replace the README's table.
    #[arg(long, conflicts_with = "readme")]
    invitations_only: bool,
    /// A setting for one binary on top of the bench's own, as
    /// `<binary>:<VARIABLE>=<value>` (repeatable), to compare configurations
    /// with the same build; its results never replace the README's table.
    #[arg(long = "service-env", conflicts_with = "readme")]
    service_env: Vec<launcher::ExtraEnv>,
}

/// Replaces the text between the results markers of `readme` with `table`;
/// `None` when the markers are missing.
fn splice(readme: &str, table: &str) -> Option<String> {
    const START: &str = "<!-- results:start -->";
    const END: &str = "<!-- results:end -->";
    let start = readme.find(START)? + START.len();
    let end = readme[start..].find(END)? + start;
    Some(format!(
        "{}\n{}\n{}",
        &readme[..start],
        table.trim_end(),
        &readme[end..]
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = launcher::EXTRA_ENV.set(args.service_env.clone());
    let bin_dir = args.bin_dir.unwrap_or_else(launcher::default_bin_dir);
    let log_dir = args.log_dir.unwrap_or_else(|| args.out.join("logs"));
    let mut settings = if args.quick {
        run::Settings::quick(bin_dir, log_dir)
    } else {
        run::Settings::full(bin_dir, log_dir)
    };
    settings.invitations_only = args.invitations_only;
    let report = run::run(settings).await?;
    std::fs::create_dir_all(&args.out)?;
    let table = report.markdown();
    std::fs::write(args.out.join("latest.md"), &table)?;
    std::fs::write(
        args.out.join("latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("chart.svg"), report.svg())?;
    if let Some(readme) = args.readme {
        let text = std::fs::read_to_string(&readme)
            .with_context(|| format!("read {}", readme.display()))?;
        let updated = splice(&text, &table)
            .with_context(|| format!("{} has no results markers", readme.display()))?;
        std::fs::write(&readme, updated)?;
    }
    eprintln!("{table}");
    eprintln!("written to {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_results_section_is_replaced_and_the_rest_kept() {
        let readme = "# Bench\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n";
        let updated = splice(readme, "| new |\n").unwrap();
        assert_eq!(
            updated,
            "# Bench\n<!-- results:start -->\n| new |\n<!-- results:end -->\nafter\n"
        );
        assert_eq!(splice("no markers", "x"), None);
    }
}
