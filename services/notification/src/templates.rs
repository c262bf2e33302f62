//! Email templates (minijinja): one file per template and locale under
//! `templates/`, each with three blocks — `subject`, `text`, `html`.
//!
//! Escaping is on by default: every template is rendered with HTML
//! auto-escaping, and only the `subject` and `text` blocks turn it off
//! explicitly (they are not HTML). Values are data, never template source, so
//! `{{ … }}` in a name is printed as is. Before rendering, every
//! user-supplied value is cleaned ([`clean`]: control and bidi characters
//! removed, length bounded — no CR/LF can reach the subject or split a text
//! line) and defanged ([`defang`]: a zero-width space after `.`, `:` and `@`,
//! so mail clients do not turn a name like `evil.example` into a link, P18).
//! The only link is the one opened from the job's sealed link, checked
//! against the public base URL by the caller.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use chrono::{DateTime, Datelike, Timelike, Utc};
use minijinja::{AutoEscape, Environment, UndefinedBehavior, context};
use usher_proto::notification::v1::EmailTemplate;

/// Locales with templates; the first is the last fallback.
pub const LOCALES: [&str; 2] = ["en", "fr"];
/// Longest user-supplied value rendered, in characters.
pub const MAX_VALUE_CHARS: usize = 200;
/// Zero-width space: breaks auto-linking without changing what is read.
const BREAK: char = '\u{200B}';

const SOURCES: [(&str, &str); 12] = [
    (
        "invitation.en",
        include_str!("../templates/invitation.en.j2"),
    ),
    (
        "invitation.fr",
        include_str!("../templates/invitation.fr.j2"),
    ),
    (
        "reinvitation.en",
        include_str!("../templates/reinvitation.en.j2"),
    ),
    (
        "reinvitation.fr",
        include_str!("../templates/reinvitation.fr.j2"),
    ),
    (
        "password_reset.en",
        include_str!("../templates/password_reset.en.j2"),
    ),
    (
        "password_reset.fr",
        include_str!("../templates/password_reset.fr.j2"),
    ),
    (
        "password_changed.en",
        include_str!("../templates/password_changed.en.j2"),
    ),
    (
        "password_changed.fr",
        include_str!("../templates/password_changed.fr.j2"),
    ),
    (
        "invitation_accepted.en",
        include_str!("../templates/invitation_accepted.en.j2"),
    ),
    (
        "invitation_accepted.fr",
        include_str!("../templates/invitation_accepted.fr.j2"),
    ),
    (
        "set_password.en",
        include_str!("../templates/set_password.en.j2"),
    ),
    (
        "set_password.fr",
        include_str!("../templates/set_password.fr.j2"),
    ),
];

/// Why an email could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The job names no template we have.
    #[error("unknown template")]
    UnknownTemplate,
    /// The template needs a link and the job has none (or the reverse).
    #[error("link missing for a template that needs one")]
    MissingLink,
    /// A bug in a template.
    #[error("template error: {0}")]
    Template(#[from] minijinja::Error),
}

/// The values a template may use, as the job gives them (cleaned here).
#[derive(Clone, Debug, Default)]
pub struct EmailValues {
    /// Recipient's display name.
    pub recipient_name: String,
    /// The account's name.
    pub account_name: String,
    /// Who invites.
    pub inviter_name: String,
    /// The role offered.
    pub role_name: String,
    /// Who joined (INVITATION_ACCEPTED).
    pub invitee_name: String,
    /// Their address (INVITATION_ACCEPTED).
    pub invitee_email: String,
    /// When the link stops working.
    pub expire_time: Option<DateTime<Utc>>,
    /// When the event happened.
    pub event_time: Option<DateTime<Utc>>,
    /// The opened, checked link (templates with a token link only).
    pub link: Option<String>,
}

/// A rendered email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedEmail {
    /// One line, no control characters.
    pub subject: String,
    /// The plain-text body.
    pub text: String,
    /// The HTML body.
    pub html: String,
    /// The locale rendered.
    pub locale: &'static str,
}

/// The compiled templates, and each one rendered once per locale and
/// per set of present values, with a marker in place of every value
/// ([`Skeleton`]): an email is then filled in, not rendered.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    skeletons: RwLock<HashMap<SkeletonKey, Arc<Skeleton>>>,
}

/// The values of a template, by slot: [`SLOT_NAMES`] order.
const SLOT_NAMES: [&str; 9] = [
    "recipient_name",
    "account_name",
    "inviter_name",
    "role_name",
    "invitee_name",
    "invitee_email",
    "expire_time",
    "event_time",
    "link",
];
/// The slot of the rendered subject (used by the HTML `<title>`).
const SUBJECT_SLOT: usize = SLOT_NAMES.len();
/// Marks a slot in a rendered skeleton: private-use characters, which no
/// template holds and HTML escaping leaves alone.
const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

/// Template, locale, and which values are non-empty (the templates branch
/// on `{% if value %}` only).
type SkeletonKey = (EmailTemplate, &'static str, u16);

/// A template rendered with markers: literal text and slots, per block.
#[derive(Debug)]
struct Skeleton {
    subject: Vec<Piece>,
    text: Vec<Piece>,
    html: Vec<Piece>,
}

#[derive(Debug)]
enum Piece {
    Literal(String),
    Slot(usize),
}

fn marker(slot: usize) -> String {
    format!("{MARK_OPEN}{slot}{MARK_CLOSE}")
}

/// Splits a rendering with markers into literals and slots.
fn pieces(rendered: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = rendered;
    while let Some(start) = rest.find(MARK_OPEN) {
        let after = &rest[start + MARK_OPEN.len_utf8()..];
        let Some(end) = after.find(MARK_CLOSE) else {
            break;
        };
        let Ok(slot) = after[..end].parse::<usize>() else {
            break;
        };
        if start > 0 {
            out.push(Piece::Literal(rest[..start].to_owned()));
        }
        out.push(Piece::Slot(slot));
        rest = &after[end + MARK_CLOSE.len_utf8()..];
    }
    if !rest.is_empty() {
        out.push(Piece::Literal(rest.to_owned()));
    }
    out
}

/// Fills `pieces` with `values`, HTML-escaped when `html`.
fn fill(pieces: &[Piece], values: &[String], html: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(pieces.len() * 48);
    for piece in pieces {
        match piece {
            Piece::Literal(text) => out.push_str(text),
            Piece::Slot(slot) => {
                let value = values.get(*slot).map_or("", String::as_str);
                if html {
                    let _ = write!(out, "{}", minijinja::HtmlEscape(value));
                } else {
                    out.push_str(value);
                }
            }
        }
    }
    out
}

/// The file stem of `template`, or `None` for UNSPECIFIED.
pub fn stem(template: EmailTemplate) -> Option<&'static str> {
    match template {
        EmailTemplate::Unspecified => None,
        EmailTemplate::Invitation => Some("invitation"),
        EmailTemplate::Reinvitation => Some("reinvitation"),
        EmailTemplate::PasswordReset => Some("password_reset"),
        EmailTemplate::PasswordChanged => Some("password_changed"),
        EmailTemplate::InvitationAccepted => Some("invitation_accepted"),
        EmailTemplate::SetPassword => Some("set_password"),
    }
}

/// Whether `template` carries a token link.
pub fn needs_link(template: EmailTemplate) -> bool {
    matches!(
        template,
        EmailTemplate::Invitation
            | EmailTemplate::Reinvitation
            | EmailTemplate::PasswordReset
            | EmailTemplate::SetPassword
    )
}

/// A supported locale from a tag like `fr`, `fr-CA` or `FR_fr`.
pub fn supported(tag: &str) -> Option<&'static str> {
    let primary = tag
        .trim()
        .split(['-', '_'])
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    LOCALES.iter().copied().find(|l| *l == primary)
}

/// The job's locale, else the account's default, else English.
pub fn resolve_locale(job_locale: &str, account_default: &str) -> &'static str {
    supported(job_locale)
        .or_else(|| supported(account_default))
        .unwrap_or(LOCALES[0])
}

/// Removes control and invisible formatting characters (CR, LF, NUL, bidi
/// overrides, zero-width characters), collapses whitespace and bounds the
/// length.
pub fn clean(value: &str) -> String {
    let kept: String = value
        .chars()
        .map(|c| {
            if c.is_control() || c.is_whitespace() {
                ' '
            } else {
                c
            }
        })
        .filter(|c| !is_invisible(*c))
        .collect();
    kept.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(MAX_VALUE_CHARS)
        .collect()
}

fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}')
}

/// Breaks what mail clients would auto-link (`a.b`, `x://`, `a@b`) with a
/// zero-width space after `.`, `:` and `@`.
pub fn defang(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        out.push(c);
        if matches!(c, '.' | ':' | '@' | '/') {
            out.push(BREAK);
        }
    }
    out
}

fn name(value: &str) -> String {
    defang(&clean(value))
}

const MONTHS_EN: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const MONTHS_FR: [&str; 12] = [
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
];

/// A date and time in words of `locale`, in UTC.
pub fn format_time(time: DateTime<Utc>, locale: &str) -> String {
    let month = usize::try_from(time.month0()).unwrap_or(0).min(11);
    if locale == "fr" {
        format!(
            "{} {} {} à {:02}:{:02} UTC",
            time.day(),
            MONTHS_FR[month],
            time.year(),
            time.hour(),
            time.minute()
        )
    } else {
        format!(
            "{} {}, {} at {:02}:{:02} UTC",
            MONTHS_EN[month],
            time.day(),
            time.year(),
            time.hour(),
            time.minute()
        )
    }
}

/// One line: control characters and runs of whitespace become one space.
fn one_line(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Templates {
    /// Compiles every template; fails only on a bug in a template file.
    pub fn new() -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // Secure default: HTML escaping everywhere; `subject` and `text`
        // blocks opt out explicitly.
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        for (name, source) in SOURCES {
            env.add_template(name, source)?;
        }
        Ok(Self {
            env,
            skeletons: RwLock::new(HashMap::new()),
        })
    }

    /// Renders `template` in `locale` (already resolved) with `values`: the
    /// template is rendered once per locale and set of present values, then
    /// filled in for each email (the same text as a full rendering).
    pub fn render(
        &self,
        template: EmailTemplate,
        locale: &'static str,
        values: &EmailValues,
    ) -> Result<RenderedEmail, RenderError> {
        let mut slots = slot_values(template, locale, values)?;
        let present = slots
            .iter()
            .enumerate()
            .filter(|(_, value)| !value.is_empty())
            .fold(0u16, |mask, (slot, _)| mask | (1 << slot));
        let key = (template, locale, present);
        let cached = self
            .skeletons
            .read()
            .ok()
            .and_then(|skeletons| skeletons.get(&key).cloned());
        let skeleton = match cached {
            Some(skeleton) => skeleton,
            None => {
                let skeleton = Arc::new(self.skeleton(template, locale, present)?);
                if let Ok(mut skeletons) = self.skeletons.write() {
                    skeletons.insert(key, skeleton.clone());
                }
                skeleton
            }
        };
        let subject = fill(&skeleton.subject, &slots, false);
        slots.push(subject.clone());
        Ok(RenderedEmail {
            subject,
            text: fill(&skeleton.text, &slots, false),
            html: fill(&skeleton.html, &slots, true),
            locale,
        })
    }

    /// Renders `template` with a marker for each present value.
    fn skeleton(
        &self,
        template: EmailTemplate,
        locale: &'static str,
        present: u16,
    ) -> Result<Skeleton, RenderError> {
        let markers: Vec<String> = (0..SLOT_NAMES.len())
            .map(|slot| {
                if present & (1 << slot) == 0 {
                    String::new()
                } else {
                    marker(slot)
                }
            })
            .collect();
        let rendered =
            self.render_blocks(template, locale, &markers, Some(marker(SUBJECT_SLOT)))?;
        Ok(Skeleton {
            subject: pieces(&rendered.subject),
            text: pieces(&rendered.text),
            html: pieces(&rendered.html),
        })
    }

    /// Renders the three blocks with `slots` (values by [`SLOT_NAMES`]),
    /// the `subject` variable being `subject` when given, else the rendered
    /// subject.
    fn render_blocks(
        &self,
        template: EmailTemplate,
        locale: &'static str,
        slots: &[String],
        subject: Option<String>,
    ) -> Result<RenderedEmail, RenderError> {
        let stem = stem(template).ok_or(RenderError::UnknownTemplate)?;
        let tmpl = self.env.get_template(&format!("{stem}.{locale}"))?;
        let base: minijinja::Value = SLOT_NAMES
            .iter()
            .zip(slots)
            .map(|(name, value)| (*name, value.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        let rendered_subject = {
            let mut state = tmpl.render_captured(context! { subject => "", ..base.clone() })?;
            one_line(&state.with_state_mut(|s| s.render_block("subject"))?)
        };
        let subject_value = subject.unwrap_or_else(|| rendered_subject.clone());
        let mut captured = tmpl.render_captured(context! { subject => subject_value, ..base })?;
        let text = captured.with_state_mut(|s| s.render_block("text"))?;
        let html = captured.with_state_mut(|s| s.render_block("html"))?;
        Ok(RenderedEmail {
            subject: rendered_subject,
            text: text.trim().to_owned() + "\n",
            html: html.trim().to_owned() + "\n",
            locale,
        })
    }

    /// A full rendering, without the skeletons: the reference the filled
    /// emails are checked against.
    #[cfg(test)]
    fn render_direct(
        &self,
        template: EmailTemplate,
        locale: &'static str,
        values: &EmailValues,
    ) -> Result<RenderedEmail, RenderError> {
        let slots = slot_values(template, locale, values)?;
        self.render_blocks(template, locale, &slots, None)
    }
}

/// The values of an email by slot ([`SLOT_NAMES`]), cleaned and formatted.
fn slot_values(
    template: EmailTemplate,
    locale: &'static str,
    values: &EmailValues,
) -> Result<Vec<String>, RenderError> {
    stem(template).ok_or(RenderError::UnknownTemplate)?;
    if needs_link(template) != values.link.is_some() {
        return Err(RenderError::MissingLink);
    }
    let when =
        |time: Option<DateTime<Utc>>| time.map(|t| format_time(t, locale)).unwrap_or_default();
    Ok(vec![
        name(&values.recipient_name),
        name(&values.account_name),
        name(&values.inviter_name),
        name(&values.role_name),
        name(&values.invitee_name),
        clean(&values.invitee_email),
        when(values.expire_time),
        when(values.event_time),
        values.link.clone().unwrap_or_default(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: &str = "https://usher.example/invite?token=abc&x=1";

    fn templates() -> Templates {
        Templates::new().expect("templates compile")
    }

    fn all() -> [EmailTemplate; 6] {
        [
            EmailTemplate::Invitation,
            EmailTemplate::Reinvitation,
            EmailTemplate::PasswordReset,
            EmailTemplate::PasswordChanged,
            EmailTemplate::InvitationAccepted,
            EmailTemplate::SetPassword,
        ]
    }

    fn values(template: EmailTemplate) -> EmailValues {
        let time = DateTime::parse_from_rfc3339("2026-08-03T09:05:00Z")
            .expect("time")
            .with_timezone(&Utc);
        EmailValues {
            recipient_name: "Ada Lovelace".into(),
            account_name: "Analytical Engines".into(),
            inviter_name: "Charles Babbage".into(),
            role_name: "Admin".into(),
            invitee_name: "Grace Hopper".into(),
            invitee_email: "grace@example.org".into(),
            expire_time: Some(time),
            event_time: Some(time),
            link: needs_link(template).then(|| LINK.to_owned()),
        }
    }

    #[test]
    fn locale_falls_back_from_job_to_account_to_english() {
        assert_eq!(resolve_locale("fr-CA", "en"), "fr");
        assert_eq!(resolve_locale("", "FR"), "fr");
        assert_eq!(resolve_locale("de", "fr_FR"), "fr");
        assert_eq!(resolve_locale("de", "es"), "en");
        assert_eq!(resolve_locale("", ""), "en");
    }

    #[test]
    fn every_template_renders_in_english_and_french() {
        let templates = templates();
        for template in all() {
            let en = templates
                .render(template, "en", &values(template))
                .expect("en renders");
            let fr = templates
                .render(template, "fr", &values(template))
                .expect("fr renders");
            for email in [&en, &fr] {
                assert!(!email.subject.is_empty(), "{template:?}");
                assert!(email.subject.contains("Analytical"), "{template:?}");
                assert!(email.html.contains("Analytical"), "{template:?}");
                assert!(email.text.contains("Analytical"), "{template:?}");
                assert!(email.html.starts_with("<!DOCTYPE html>"), "{template:?}");
                let links = email.html.matches("<a ").count();
                if needs_link(template) {
                    assert_eq!(links, 1, "{template:?}");
                    assert!(email.text.contains(LINK), "{template:?}");
                    let escaped = minijinja::HtmlEscape(LINK).to_string();
                    assert!(email.html.contains(&escaped), "{template:?}");
                    assert!(email.text.contains("2026"), "{template:?}");
                } else {
                    assert_eq!(links, 0, "{template:?}");
                    assert!(!email.text.contains("://"), "{template:?}");
                }
            }
            assert!(en.html.contains("lang=\"en\""));
            assert!(fr.html.contains("lang=\"fr\""));
            assert!(en.text.starts_with("Hello"), "{}", en.text);
            assert!(fr.text.starts_with("Bonjour"), "{}", fr.text);
            assert_ne!(en.subject, fr.subject);
        }
        let fr = templates
            .render(
                EmailTemplate::Invitation,
                "fr",
                &values(EmailTemplate::Invitation),
            )
            .expect("renders");
        assert!(fr.text.contains("3 août 2026 à 09:05 UTC"), "{}", fr.text);
        assert!(fr.subject.contains("vous invite"), "{}", fr.subject);
        let en = templates
            .render(
                EmailTemplate::Invitation,
                "en",
                &values(EmailTemplate::Invitation),
            )
            .expect("renders");
        assert!(
            en.text.contains("August 3, 2026 at 09:05 UTC"),
            "{}",
            en.text
        );
        assert!(
            en.text.contains("Charles Babbage invited you"),
            "{}",
            en.text
        );
    }

    #[test]
    fn hostile_names_are_escaped_and_inert() {
        let hostile = "<a href=\"https://evil.example\">x</a>\r\nBcc: victim@evil.example\n{{ 7*7 }}{% if true %}T{% endif %} www.evil.example \u{202E}";
        let templates = templates();
        for template in all() {
            for locale in LOCALES {
                let mut values = values(template);
                values.recipient_name = hostile.into();
                values.account_name = hostile.into();
                values.inviter_name = hostile.into();
                values.role_name = hostile.into();
                values.invitee_name = hostile.into();
                let email = templates
                    .render(template, locale, &values)
                    .expect("renders");
                for part in [&email.subject, &email.text, &email.html] {
                    assert!(!part.contains("evil.example"), "{template:?} {part}");
                    assert!(!part.contains("49"), "{template:?} {part}");
                    assert!(!part.contains('\u{202E}'), "{template:?}");
                    assert!(part.contains("{{ 7*7 }}"), "{template:?} {part}");
                }
                assert!(!email.subject.contains(['\r', '\n']));
                assert!(!email.text.contains('\r'));
                assert!(
                    !email.text.lines().any(|l| l.starts_with("Bcc")),
                    "{}",
                    email.text
                );
                assert!(!email.html.contains("<a href=\"https:/"), "{}", email.html);
                assert!(email.html.contains("&lt;a href="), "{}", email.html);
                let expected_links = usize::from(needs_link(template));
                assert_eq!(email.html.matches("<a ").count(), expected_links);
                assert_eq!(email.text.matches("://").count(), expected_links);
                assert_eq!(
                    email.html.matches("https:&#x2f;&#x2f;").count(),
                    expected_links
                );
            }
        }
    }

    #[test]
    fn a_link_is_required_exactly_where_the_template_has_one() {
        let templates = templates();
        let mut values = values(EmailTemplate::Invitation);
        values.link = None;
        assert!(matches!(
            templates.render(EmailTemplate::Invitation, "en", &values),
            Err(RenderError::MissingLink)
        ));
        values.link = Some(LINK.into());
        assert!(matches!(
            templates.render(EmailTemplate::PasswordChanged, "en", &values),
            Err(RenderError::MissingLink)
        ));
        assert!(matches!(
            templates.render(EmailTemplate::Unspecified, "en", &values),
            Err(RenderError::UnknownTemplate)
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_name_stays_on_one_line_and_inert(name in "\\PC{0,80}[\r\n\u{202E}<>\"'&{}%#.:/@]{0,20}\\PC{0,80}") {
            let cleaned = clean(&name);
            proptest::prop_assert!(cleaned.chars().count() <= MAX_VALUE_CHARS);
            proptest::prop_assert!(!cleaned.chars().any(|c| c.is_control() || is_invisible(c)));
            let templates = templates();
            let mut values = values(EmailTemplate::Invitation);
            values.inviter_name = name.clone();
            values.account_name = name;
            let email = templates
                .render(EmailTemplate::Invitation, "en", &values)
                .expect("renders");
            proptest::prop_assert!(!email.subject.chars().any(char::is_control));
            proptest::prop_assert_eq!(email.html.matches("<a ").count(), 1);
            proptest::prop_assert_eq!(email.text.matches("://").count(), 1);
            proptest::prop_assert!(!email.html.contains("<script"));
        }
    }

    proptest::proptest! {
        /// Filling a skeleton gives exactly the full rendering, for every
        /// template and locale, with values present or not, hostile or not.
        #[test]
        fn a_filled_skeleton_is_the_full_rendering(
            names in proptest::collection::vec("(\\PC{0,30}[<>\"'&{}%#.:/@ \u{E000}\u{E001}]{0,6}){0,2}", 6),
            with_times in proptest::bool::ANY,
        ) {
            let templates = templates();
            for template in all() {
                for locale in LOCALES {
                    let mut values = values(template);
                    values.recipient_name = names[0].clone();
                    values.account_name = names[1].clone();
                    values.inviter_name = names[2].clone();
                    values.role_name = names[3].clone();
                    values.invitee_name = names[4].clone();
                    values.invitee_email = names[5].clone();
                    if !with_times {
                        values.expire_time = None;
                        values.event_time = None;
                    }
                    // Twice: the second is filled from the cached skeleton.
                    for _ in 0..2 {
                        let filled = templates.render(template, locale, &values).expect("renders");
                        let direct = templates
                            .render_direct(template, locale, &values)
                            .expect("renders");
                        proptest::prop_assert_eq!(&filled, &direct);
                    }
                }
            }
        }
    }

    #[test]
    fn clean_bounds_and_flattens() {
        assert_eq!(clean("  a\r\n\tb \u{0000} c "), "a b c");
        assert_eq!(clean(&"x".repeat(500)).chars().count(), MAX_VALUE_CHARS);
        assert_eq!(defang("a.b"), "a.\u{200B}b");
    }
}
