//! The one way chatfleet shows a URL in a message, a log line or a metric: with its credentials
//! hidden. Every crate that prints a broker, store or model URL goes through [`redact_url`].

/// `url` with any user name and password replaced by `***`, and the values of query options
/// that name a secret (`password`, `secret`, `token`, `key`) replaced by `***`.
///
/// Credentials end at the last `@` before the options: a password may itself contain an
/// unescaped `@` or `/`, so the first `/` is not a reliable end of the host list (MongoDB URLs
/// list several hosts). Something that is not a URL at all might be a bare credential, so none
/// of it is shown.
pub fn redact_url(url: &str) -> String {
    // A list of servers (`nats://a:4222,nats://b:4222`) is redacted URL by URL; a comma not
    // followed by a scheme separates hosts within one URL (MongoDB's `h1:27017,h2:27017`).
    let mut urls: Vec<String> = Vec::new();
    for part in url.split(',') {
        match urls.last_mut() {
            Some(current) if !part.contains("://") => {
                current.push(',');
                current.push_str(part);
            }
            _ => urls.push(part.trim().to_owned()),
        }
    }
    urls.iter().map(|one| redact_one(one)).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(malformed URL)".to_owned();
    };
    let (before_options, options) = match rest.split_once('?') {
        Some((before, options)) => (before, Some(options)),
        None => (rest, None),
    };
    let mut shown = match before_options.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &before_options[at + 1..]),
        None => format!("{scheme}://{before_options}"),
    };
    if let Some(options) = options {
        shown.push('?');
        shown.push_str(&redact_options(options));
    }
    shown
}

fn redact_options(options: &str) -> String {
    options
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if names_a_secret(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn names_a_secret(option: &str) -> bool {
    let option = option.to_ascii_lowercase();
    ["password", "secret", "token", "key"].iter().any(|word| option.contains(word))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn user_and_password_are_hidden() {
        assert_eq!(redact_url("nats://alice:s3cret@host:4222"), "nats://***@host:4222");
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://***@127.0.0.1:5672/%2f");
    }

    #[test]
    fn a_password_holding_at_signs_and_slashes_is_hidden_whole() {
        assert_eq!(redact_url("mongodb://u:p@ss/w@rd@h1:27017,h2:27017/db"), "mongodb://***@h1:27017,h2:27017/db");
    }

    #[test]
    fn secret_options_are_hidden_and_others_kept() {
        assert_eq!(
            redact_url("mongodb://h:27017/db?tls=true&tlsCertificateKeyFilePassword=pw&appName=x"),
            "mongodb://h:27017/db?tls=true&tlsCertificateKeyFilePassword=***&appName=x"
        );
        assert_eq!(redact_url("https://api.example.com/v1?api_key=sk-1"), "https://api.example.com/v1?api_key=***");
    }

    #[test]
    fn each_url_of_a_server_list_is_redacted() {
        assert_eq!(redact_url("nats://u:p@a:4222, nats://b:4222"), "nats://***@a:4222,nats://b:4222");
        assert_eq!(redact_url("nats://a:4222,nats://u:p@b:4222"), "nats://a:4222,nats://***@b:4222");
    }

    #[test]
    fn a_url_without_credentials_is_unchanged() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("https://api.openai.com/v1"), "https://api.openai.com/v1");
    }

    #[test]
    fn something_that_is_not_a_url_is_not_shown() {
        assert_eq!(redact_url("sk-secret-key"), "(malformed URL)");
    }
}
