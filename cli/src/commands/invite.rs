//! `usher invite`: addresses given as arguments, pasted text or a CSV file,
//! sent in calls of at most 1,000 entries (the API's limit per call), with
//! one verdict shown per address.
//!
//! Text is split into entries on this side with the same parser the
//! invitation service uses (`usher_kit::email::parse_list`), only to cut it
//! into calls: each call carries its entries as given (`raw_text`), so the
//! service still parses, canonicalises and judges every one, and the
//! verdicts show the entries exactly as typed.

use std::{io::Read, path::PathBuf};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use usher_proto::invitation::v1::{
    CreateInvitationsRequest, CreateInvitationsResponse, InviteeInput, InviteeResult,
    InviteeVerdict, invitation_service_client::InvitationServiceClient,
};

use crate::{
    client::Client,
    commands::resolve,
    output::{self, enum_name, line, note},
    rpc,
};

/// Most entries in one CreateInvitations call.
pub const MAX_PER_CALL: usize = 1_000;

/// `usher invite`.
#[derive(Debug, clap::Args)]
pub struct InviteArgs {
    /// Addresses, as `ada@example.com` or `"Ada Lovelace <ada@example.com>"`
    /// (several per argument may be separated by commas or spaces).
    pub addresses: Vec<String>,
    /// Read addresses from a file (`-` for standard input): pasted text (one
    /// or more per line), or a CSV file with an `email` column (and an
    /// optional `name` column) when it ends in `.csv` or with `--csv`.
    #[arg(long, short = 'f')]
    pub from_file: Option<PathBuf>,
    /// Read `--from-file` as CSV with a header row.
    #[arg(long, requires = "from_file")]
    pub csv: bool,
    /// The role every invitee gets, by name or id.
    #[arg(long, default_value = "User")]
    pub role: String,
    /// The team every invitee joins, by name or id.
    #[arg(long)]
    pub team: Option<String>,
    /// A product to grant (code or name); repeat for several.
    #[arg(long = "product")]
    pub products: Vec<String>,
    /// Locale of the emails and page (`en`, `fr`); default: the account's.
    #[arg(long, default_value = "")]
    pub locale: String,
    /// Show the verdicts without inviting anyone (no seat, no email).
    #[arg(long)]
    pub dry_run: bool,
}

/// Entries of one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// Entries of pasted text, as given.
    Text(Vec<String>),
    /// Rows of a CSV file.
    List(Vec<InviteeInput>),
}

impl Batch {
    fn len(&self) -> usize {
        match self {
            Self::Text(entries) => entries.len(),
            Self::List(rows) => rows.len(),
        }
    }
}

/// Splits pasted text into its entries (as given), line by line.
pub fn text_entries(text: &str) -> anyhow::Result<Vec<String>> {
    let mut entries = Vec::new();
    for (number, text_line) in text.lines().enumerate() {
        let parsed = usher_kit::email::parse_list(text_line)
            .map_err(|e| anyhow::anyhow!("line {}: {e}", number + 1))?;
        if parsed.len() >= usher_kit::email::MAX_LIST_ENTRIES {
            anyhow::bail!(
                "line {}: more than {} entries on one line",
                number + 1,
                usher_kit::email::MAX_LIST_ENTRIES - 1
            );
        }
        entries.extend(parsed.into_iter().map(|entry| entry.input));
    }
    Ok(entries)
}

/// Reads a CSV file with a header row naming an `email` column (also
/// `e-mail`, `email address`) and optionally a `name` column (also
/// `display name`, `display_name`, `full name`).
pub fn csv_entries(text: &str) -> anyhow::Result<Vec<InviteeInput>> {
    let first_line = text.lines().next().unwrap_or_default();
    let delimiter = [b',', b';', b'\t']
        .into_iter()
        .max_by_key(|d| first_line.bytes().filter(|b| b == d).count())
        .unwrap_or(b',');
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers().context("reading the CSV header")?.clone();
    let column = |names: &[&str]| {
        headers.iter().position(|h| {
            let h = h.trim().trim_start_matches('\u{FEFF}').to_lowercase();
            names.contains(&h.as_str())
        })
    };
    let email = column(&["email", "e-mail", "email address", "mail"]).context(
        "the CSV file has no `email` column in its header (or use a text file, one address a line)",
    )?;
    let name = column(&["name", "display name", "display_name", "full name"]);
    let mut rows = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("CSV row {}", index + 2))?;
        let address = record.get(email).unwrap_or_default();
        let display_name = name
            .and_then(|n| record.get(n))
            .unwrap_or_default()
            .to_owned();
        if address.is_empty() && display_name.is_empty() {
            continue;
        }
        rows.push(InviteeInput {
            email: address.to_owned(),
            display_name,
        });
    }
    Ok(rows)
}

/// Cuts entries into calls of at most [`MAX_PER_CALL`].
pub fn batches(text: Vec<String>, rows: Vec<InviteeInput>) -> Vec<Batch> {
    let mut batches: Vec<Batch> = text
        .chunks(MAX_PER_CALL)
        .map(|c| Batch::Text(c.to_vec()))
        .collect();
    batches.extend(rows.chunks(MAX_PER_CALL).map(|c| Batch::List(c.to_vec())));
    batches
}

fn read_source(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading addresses from standard input")?;
        return Ok(text);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// Invites the addresses and shows each verdict.
pub async fn invite(client: &mut Client, args: InviteArgs) -> anyhow::Result<()> {
    let mut text = text_entries(&args.addresses.join("\n"))?;
    let mut rows = Vec::new();
    if let Some(path) = &args.from_file {
        let content = read_source(path)?;
        let is_csv = args.csv
            || path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        if is_csv {
            rows = csv_entries(&content)?;
        } else {
            text.extend(text_entries(&content)?);
        }
    }
    let total = text.len() + rows.len();
    if total == 0 {
        anyhow::bail!("no address to invite: give addresses as arguments or --from-file");
    }
    let role_id = resolve::role_id(client, &args.role).await?;
    let team_id = match &args.team {
        Some(team) => resolve::team_id(client, team).await?,
        None => String::new(),
    };
    let products = resolve::product_codes(client, &args.products).await?;

    let batches = batches(text, rows);
    let progress = if batches.len() > 1 && !client.json {
        ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} addresses ({eta} left)")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut merged = CreateInvitationsResponse {
        dry_run: args.dry_run,
        ..Default::default()
    };
    for batch in batches {
        let size = batch.len();
        let mut request = CreateInvitationsRequest {
            role_id: role_id.clone(),
            team_id: team_id.clone(),
            products: products.clone(),
            locale: args.locale.clone(),
            dry_run: args.dry_run,
            ..Default::default()
        };
        match batch {
            Batch::Text(entries) => request.raw_text = entries.join("\n"),
            Batch::List(list) => request.invitees = list,
        }
        let response = rpc!(client, InvitationServiceClient, create_invitations, request);
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                progress.abandon();
                if !merged.results.is_empty() {
                    show(client.json, &merged)?;
                    note(format!(
                        "Stopped after {} of {total} addresses.",
                        merged.results.len()
                    ));
                }
                return Err(error.context("inviting"));
            }
        };
        merge(&mut merged, response);
        progress.inc(size as u64);
    }
    progress.finish_and_clear();
    show(client.json, &merged)
}

/// Adds one call's response to the running total.
pub fn merge(total: &mut CreateInvitationsResponse, part: CreateInvitationsResponse) {
    total.results.extend(part.results);
    total.invited_count += part.invited_count;
    total.not_invited_count += part.not_invited_count;
    total.seats_used = part.seats_used;
    total.seat_limit = part.seat_limit;
}

fn show(json: bool, response: &CreateInvitationsResponse) -> anyhow::Result<()> {
    if json {
        return output::json("usher.invitation.v1.CreateInvitationsResponse", response);
    }
    line(output::table(
        &["INPUT", "EMAIL", "VERDICT", "DETAIL"],
        response.results.iter().map(row),
    ));
    line(summary(response));
    Ok(())
}

/// The short name of a verdict, e.g. `INVALID_ADDRESS`.
pub fn verdict_name(verdict: i32) -> String {
    InviteeVerdict::try_from(verdict).map_or_else(
        |_| format!("verdict {verdict}"),
        |v| enum_name(v.as_str_name(), "INVITEE_VERDICT_"),
    )
}

fn row(result: &InviteeResult) -> Vec<String> {
    let detail = if !result.reason.is_empty() {
        result.reason.clone()
    } else if let Some(invitation) = &result.invitation {
        format!("invitation {}", invitation.id)
    } else if !result.existing_invitation_id.is_empty() {
        format!("existing invitation {}", result.existing_invitation_id)
    } else {
        String::new()
    };
    vec![
        result.input.clone(),
        result.email.clone(),
        verdict_name(result.verdict),
        detail,
    ]
}

/// The line under the table.
pub fn summary(response: &CreateInvitationsResponse) -> String {
    let count = response.results.len();
    let mut text = format!(
        "{count} address{}: {} {}invited, {} not invited; seats {}/{}",
        if count == 1 { "" } else { "es" },
        response.invited_count,
        if response.dry_run { "would be " } else { "" },
        response.not_invited_count,
        response.seats_used,
        response.seat_limit
    );
    if response.dry_run {
        text.push_str(" (dry run: nothing was sent)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasted_text_splits_like_the_service() {
        let entries = text_entries(
            "ada@example.com, \"Lovelace, Ada\" <ada2@example.com>\nbob@example.com;not-an-email\n\n",
        )
        .expect("parsed");
        assert_eq!(
            entries,
            [
                "ada@example.com",
                "\"Lovelace, Ada\" <ada2@example.com>",
                "bob@example.com",
                "not-an-email"
            ]
        );
    }

    #[test]
    fn csv_files_use_the_email_and_name_columns() {
        let rows = csv_entries(
            "\u{FEFF}Name;E-mail;Team\nAda Lovelace;ada@example.com;x\n;;\n;bob@example.com;y\n",
        )
        .expect("parsed");
        assert_eq!(
            rows,
            [
                InviteeInput {
                    email: "ada@example.com".into(),
                    display_name: "Ada Lovelace".into()
                },
                InviteeInput {
                    email: "bob@example.com".into(),
                    display_name: String::new()
                },
            ]
        );
        let error = csv_entries("who,where\na,b\n").expect_err("no email column");
        assert!(error.to_string().contains("`email` column"), "{error}");
    }

    #[test]
    fn large_lists_are_cut_into_calls_of_a_thousand() {
        let text: Vec<String> = (0..2_500).map(|i| format!("u{i}@example.com")).collect();
        let rows = vec![InviteeInput::default(); 1_001];
        let sizes: Vec<usize> = batches(text, rows).iter().map(Batch::len).collect();
        assert_eq!(sizes, [1_000, 1_000, 500, 1_000, 1]);
    }

    #[test]
    fn responses_merge_and_summarise() {
        let mut total = CreateInvitationsResponse {
            dry_run: true,
            ..Default::default()
        };
        for (invited, not) in [(2, 1), (1, 0)] {
            merge(
                &mut total,
                CreateInvitationsResponse {
                    results: vec![InviteeResult::default(); (invited + not) as usize],
                    invited_count: invited,
                    not_invited_count: not,
                    seats_used: 3 + invited,
                    seat_limit: 10,
                    dry_run: true,
                },
            );
        }
        assert_eq!(
            summary(&total),
            "4 addresses: 3 would be invited, 1 not invited; seats 4/10 (dry run: nothing was sent)"
        );
    }

    #[test]
    fn verdicts_have_short_names() {
        assert_eq!(
            verdict_name(InviteeVerdict::InvalidAddress as i32),
            "INVALID_ADDRESS"
        );
        assert_eq!(verdict_name(99), "verdict 99");
    }
}
