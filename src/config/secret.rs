//! Values that must not reach the logs: the [`Secret`] wrapper and the redaction of passwords
//! in connection URLs.

use std::fmt;

use serde::Deserialize;

/// A value that must not end up in logs: `Debug` prints a placeholder.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the rare place that must send it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with a candidate (a bearer token from a request) in time that does not depend
    /// on where they differ, so response timing does not reveal a prefix of the secret.
    pub fn matches(&self, candidate: &str) -> bool {
        let (secret, candidate) = (self.0.as_bytes(), candidate.as_bytes());
        if secret.len() != candidate.len() {
            return false;
        }
        let difference = secret
            .iter()
            .zip(candidate)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.0)
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Replaces the password in `scheme://user:password@host/...` and in a `password=` query
/// parameter (Postgres accepts both) so the URL can be logged.
pub(super) fn redact_url_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut redacted = redact_userinfo_password(base);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&params.join("&"));
    }
    redacted
}

fn redact_userinfo_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    // The last '@' ends the userinfo: a password with an unencoded '@' is still hidden whole.
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let (userinfo, host) = authority.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{host}{}", &rest[authority_end..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::testing::env;

    #[test]
    fn debug_output_hides_the_admin_token_and_url_passwords() {
        let config = Config::load_from(
            Some((
                "test.yaml",
                "rabbitmq:\n  url: amqp://app:rabbitpw@mq:5672/%2f\n\
                 database:\n  url: postgres://app:dbpw@db:5432/x\n",
            )),
            env(&[("ATTUNE__API__ADMIN_TOKEN", "s3cret")]),
        )
        .expect("loads");
        let debug = format!("{config:?}");
        for secret in ["s3cret", "rabbitpw", "dbpw"] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        assert!(debug.contains("amqp://app:***@mq:5672/%2f"), "{debug}");
        assert!(debug.contains("postgres://app:***@db:5432/x"), "{debug}");
    }

    #[test]
    fn secret_matches_only_the_same_value() {
        let secret = Secret::new("token");
        assert!(secret.matches("token"));
        assert!(!secret.matches("tokem"));
        assert!(!secret.matches("token2"));
        assert!(!secret.matches(""));
    }

    #[test]
    fn url_redaction_hides_passwords_and_nothing_else() {
        assert_eq!(
            redact_url_password("postgres://postgres@127.0.0.1:5432/x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(redact_url_password("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(
            redact_url_password("postgres://u:p@ss@db/x?sslmode=disable&password=pw"),
            "postgres://u:***@db/x?sslmode=disable&password=***"
        );
    }
}
