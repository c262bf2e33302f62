//! Storage of the identity service: the schema, its sea-orm entities and the
//! repositories the domain calls.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod entities;
pub mod events;
pub mod idempotency;
pub mod principals;
pub mod schema;
pub mod scoped;
pub mod users;

/// A `LIKE` pattern matching `term` anywhere, with `%`, `_` and `\` in the
/// term matched literally (backslash is the escape character).
pub fn contains_pattern(term: &str) -> String {
    let mut pattern = String::with_capacity(term.len() + 2);
    pattern.push('%');
    for c in term.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}
