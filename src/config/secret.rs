//! Secrets: masking them for display, and reading them from files.

/// Masks secrets for display: the whole value of a secret setting (a password, a token, a key, but
/// not the path of a `*_FILE`), and inside any other value the secrets of URLs (the password of
/// `user:password@`, query parameters with a secret-like name such as `?password=`, `sslpassword`,
/// `api_key`) and of libpq `key=value` strings (quoted or not, spaces around `=`, escapes). A value
/// that looks like a connection string but cannot be parsed is masked whole if it mentions a secret.
pub fn mask(setting: &str, value: &str) -> String {
    let name = setting.to_ascii_lowercase();
    if name.contains("password") || (is_secret_name(&name) && !name.ends_with("_file")) {
        return if value.is_empty() {
            String::new()
        } else {
            MASK.into()
        };
    }
    masking::mask_value(value)
}

const MASK: &str = "****";

/// Whether a parameter named so holds a secret (case-insensitive, and generous: masking a harmless
/// value costs nothing, showing a secret does).
fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "credential",
        "private",
        "signature",
    ]
    .iter()
    .any(|w| name.contains(w))
}

/// A small parser for the two shapes connection settings come in: URLs
/// (`scheme://user:password@host/path?k=v&k=v#fragment`) and libpq's `key=value key='quoted value'`.
mod masking {
    use super::{is_secret_name, MASK};

    pub fn mask_value(value: &str) -> String {
        if let Some(start) = url_start(value) {
            if start == 0 {
                return mask_url(value);
            }
        }
        if value.contains('=') {
            if let Some(masked) = mask_conninfo(value) {
                return masked;
            }
            if is_secret_name(value) {
                return MASK.into();
            }
        }
        // Anything else that carries a URL somewhere: everything from its scheme on is a URL.
        match url_start(value) {
            Some(start) => format!("{}{}", &value[..start], mask_url(&value[start..])),
            None => value.to_string(),
        }
    }

    /// Where the first `scheme://` begins (scheme: a letter, then letters, digits, `+ - . _`).
    fn url_start(value: &str) -> Option<usize> {
        let sep = value.find("://")?;
        let scheme_ok = |c: char| c.is_ascii_alphanumeric() || "+-._".contains(c);
        let start = value[..sep]
            .char_indices()
            .rev()
            .take_while(|&(_, c)| scheme_ok(c))
            .last()
            .map(|(i, _)| i)?;
        value[start..]
            .starts_with(|c: char| c.is_ascii_alphabetic())
            .then_some(start)
    }

    /// `value` starts with `scheme://`.
    fn mask_url(value: &str) -> String {
        let sep = value.find("://").expect("a URL") + 3;
        let (scheme, rest) = value.split_at(sep);
        // The user info ends at an `@`, but which one is ambiguous once a password holds unencoded
        // `@`, `/` or `?`, and parsers differ: libpq takes the first `@` before the path,
        // tokio-postgres the first `@` anywhere. `config check` must hide whatever any of them (or
        // the user) took for the password, so the user info runs to the latest of: the first `@`,
        // the last `@` before the path, the last `@` before the query, and the last `@` at all
        // unless that one sits in a query parameter's value (`?user=a@b`). Without a `:` in it
        // there is no password there.
        let before = |stops: &[char]| rest.find(|c| stops.contains(&c)).unwrap_or(rest.len());
        let last = rest.rfind('@').filter(|&l| {
            let segment_start = rest[..l].rfind(['?', '&']);
            !segment_start.is_some_and(|s| rest[s..l].contains('='))
        });
        let at = [
            rest.find('@'),
            rest[..before(&['/'])].rfind('@'),
            rest[..before(&['?', '#'])].rfind('@'),
            last,
        ]
        .into_iter()
        .flatten()
        .max()
        .filter(|&at| rest[..at].contains(':'));
        let mut out = String::from(scheme);
        let after = match at {
            Some(at) => {
                let userinfo = &rest[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                &rest[at..]
            }
            None => rest,
        };
        let Some(q) = after.find('?') else {
            out.push_str(after);
            return out;
        };
        out.push_str(&after[..=q]);
        let query = &after[q + 1..];
        let (query, fragment) = match query.find('#') {
            Some(h) => query.split_at(h),
            None => (query, ""),
        };
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if is_secret_name(&percent_decode(k)) && !v.is_empty() => {
                    format!("{k}={MASK}")
                }
                Some((k, v)) => {
                    let decoded = percent_decode(v);
                    if mask_value(&decoded) == decoded {
                        kv.to_string()
                    } else {
                        format!("{k}={MASK}")
                    }
                }
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
        out.push_str(fragment);
        out
    }

    /// `%XX` decoded (invalid sequences kept as they are), for comparing names.
    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// libpq's `keyword = value` list: whitespace between pairs and around `=`; a value is either
    /// unquoted (up to whitespace) or in single quotes; a backslash escapes the next character in
    /// both. Secret values become `****`, everything else (spacing included) is kept. `None` when
    /// the text is not such a list.
    fn mask_conninfo(s: &str) -> Option<String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        let take_ws = |r: &str| r.len() - r.trim_start().len();
        loop {
            let ws = take_ws(rest);
            out.push_str(&rest[..ws]);
            rest = &rest[ws..];
            if rest.is_empty() {
                return Some(out);
            }
            let key_len = rest
                .find(|c: char| c.is_whitespace() || c == '=')
                .unwrap_or(rest.len());
            if key_len == 0 {
                return None;
            }
            let key = &rest[..key_len];
            out.push_str(key);
            rest = &rest[key_len..];
            let ws = take_ws(rest);
            if !rest[ws..].starts_with('=') {
                return None;
            }
            let eq = ws + 1;
            let ws = eq + take_ws(&rest[eq..]);
            out.push_str(&rest[..ws]);
            rest = &rest[ws..];
            let mut chars = rest.char_indices();
            let quoted = rest.starts_with('\'');
            if quoted {
                chars.next();
            }
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        // The escaped character, whatever it is; a trailing backslash is invalid.
                        chars.next()?;
                    }
                    '\'' if quoted => {
                        end = Some(i + 1);
                        break;
                    }
                    c if !quoted && c.is_whitespace() => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = match end {
                Some(e) => e,
                None if quoted => return None, // unterminated quote
                None => rest.len(),
            };
            let value = &rest[..end];
            let empty = value.is_empty() || value == "''";
            if is_secret_name(key) && !empty {
                out.push_str(if quoted { "'****'" } else { MASK });
            } else if value.contains("://") {
                out.push_str(&mask_value(value));
            } else {
                out.push_str(value);
            }
            rest = &rest[end..];
        }
    }
}

/// Reads a secret from a file: the whole content without the trailing newline. The error names the
/// file, never the content.
pub fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            mask("CDC_RELAY_PG_URL", "postgres://u:secret@h:5432/db"),
            "postgres://u:****@h:5432/db"
        );
        assert_eq!(
            mask("CDC_RELAY_PG_URL", "host=h password=secret user=u"),
            "host=h password=**** user=u"
        );
        assert_eq!(mask("CDC_RELAY_CLICKHOUSE_PASSWORD", "secret"), "****");
        assert_eq!(mask("CDC_RELAY_TOPIC", "t"), "t");
    }

    #[test]
    fn secrets_are_masked_in_every_form() {
        let pg = |v: &str| mask("CDC_RELAY_PG_URL", v);
        // (input, expected): the secret is always the text "S3cr3t"-something.
        let cases = [
            // URL query parameters, any case, percent-encoded names.
            (
                "postgres://h/db?password=S3cr3t",
                "postgres://h/db?password=****",
            ),
            (
                "postgres://u@h:5432/db?sslmode=require&sslpassword=S3cr3t&application_name=x",
                "postgres://u@h:5432/db?sslmode=require&sslpassword=****&application_name=x",
            ),
            (
                "postgresql://u:S3cr3t@h/db?PassWord=S3cr3t2#frag",
                "postgresql://u:****@h/db?PassWord=****#frag",
            ),
            (
                "postgres://h/db?pass%77ord=S3cr3t&api_KEY=S3cr3t2&x_token=S3cr3t3&client_secret=S3cr3t4",
                "postgres://h/db?pass%77ord=****&api_KEY=****&x_token=****&client_secret=****",
            ),
            // Empty values stay empty (nothing to hide, and it shows the setting is blank).
            ("postgres://h/db?password=", "postgres://h/db?password="),
            // User info, also with characters libpq would want encoded.
            (
                "https://default:S3cr3t@ch.example:8443/?database=x",
                "https://default:****@ch.example:8443/?database=x",
            ),
            ("http://u:S3/cr3t@h:1/db", "http://u:****@h:1/db"),
            ("http://u:S3?cr3t@h:1/db", "http://u:****@h:1/db"),
            ("http://u:S3@cr3t@h:1/db?user=a@b", "http://u:****@h:1/db?user=a@b"),
            ("postgres://u:S3cr3t@h1:1,h2:2/db", "postgres://u:****@h1:1,h2:2/db"),
            // Options that carry a secret-looking setting are masked whole.
            (
                "postgres://h/db?options=-c%20password%3DS3cr3t",
                "postgres://h/db?options=****",
            ),
            (
                "postgres://h/db?options=-c%20search_path%3Dapp",
                "postgres://h/db?options=-c%20search_path%3Dapp",
            ),
            // key=value strings: quoted, spaces around `=`, escaped quotes and backslashes.
            (
                "host=h password=S3cr3t user=u",
                "host=h password=**** user=u",
            ),
            (
                "host=h password='S3cr3t with spaces' user=u",
                "host=h password='****' user=u",
            ),
            (
                "host=h  password  =  'S3cr3t'   dbname=d",
                "host=h  password  =  '****'   dbname=d",
            ),
            (
                r"host=h password='S3cr3t \' still secret' user=u",
                "host=h password='****' user=u",
            ),
            (
                r"host=h password=S3cr3t\ still user=u",
                "host=h password=**** user=u",
            ),
            (
                "host=h PASSWORD=S3cr3t sslpassword='S3cr3t2' sslkey=/k.pem",
                "host=h PASSWORD=**** sslpassword='****' sslkey=****",
            ),
            ("host=h password='' user=u", "host=h password='' user=u"),
            // As libpq reads it: the value after `=` and spaces is `user=u`.
            ("host=h password= user=u", "host=h password= ****"),
            // Unparseable with a secret in it: masked whole.
            ("host=h password='S3cr3t", "****"),
            ("=S3cr3t password", "****"),
            // Nothing secret: unchanged.
            ("host=h user=u dbname=d", "host=h user=u dbname=d"),
            ("postgres://u@h/db", "postgres://u@h/db"),
        ];
        for (input, want) in cases {
            assert_eq!(pg(input), want, "{input}");
            let got = pg(input);
            assert!(!got.contains("S3cr3t"), "{input} -> {got}");
        }
        // Kafka and ClickHouse settings go through the same masking.
        assert_eq!(
            mask(
                "CDC_RELAY_KAFKA_BROKERS",
                "SASL_SSL://u:S3cr3t@k1:9093,k2:9093"
            ),
            "SASL_SSL://u:****@k1:9093,k2:9093"
        );
        assert_eq!(
            mask("CDC_RELAY_KAFKA_BROKERS", "k1:9092,k2:9092"),
            "k1:9092,k2:9092"
        );
        assert_eq!(
            mask(
                "CDC_RELAY_CLICKHOUSE_URL",
                "https://u:S3cr3t@h/?password=S3cr3t2"
            ),
            "https://u:****@h/?password=****"
        );
        assert_eq!(mask("CDC_RELAY_KAFKA_SASL_PASSWORD", "S3cr3t"), "****");
        assert_eq!(mask("CDC_RELAY_SOME_API_TOKEN", "S3cr3t"), "****");
        // File settings show the path (it is not the secret).
        assert_eq!(
            mask("CDC_RELAY_KAFKA_SSL_KEY_FILE", "/etc/k.pem"),
            "/etc/k.pem"
        );
        // Free text with a URL inside.
        assert_eq!(
            mask("CDC_RELAY_X", "see http://u:S3cr3t@h/x"),
            "see http://u:****@h/x"
        );
    }

    proptest::proptest! {
        /// Whatever surrounds it, a password in a URL's user info, in a secret query parameter or
        /// in a key=value string never survives masking.
        #[test]
        fn no_password_survives_masking(
            secret in "[A-Za-z0-9 '\\\\/?@#&=%:]{1,20}",
            user in "[a-z]{1,8}",
            form in 0usize..5,
        ) {
            let marker = format!("Zq{secret}Zq");
            let enc: String = marker.bytes().map(|b| format!("%{b:02X}")).collect();
            let quoted = marker.replace('\\', "\\\\").replace('\'', "\\'");
            let value = match form {
                0 => format!("postgres://{user}:{enc}@h:5432/db"),
                1 => format!("postgres://{user}@h/db?sslmode=require&password={enc}"),
                2 => format!("host=h user={user} password='{quoted}' dbname=d"),
                3 => format!("host=h password = '{quoted}'"),
                // Unencoded: with `=` as well it could pass for a query parameter.
                _ => format!("https://{user}:{}@h:8443/", marker.replace('=', "")),
            };
            let masked = mask("CDC_RELAY_PG_URL", &value);
            let raw = if form == 4 { marker.replace('=', "") } else { marker.clone() };
            proptest::prop_assert!(!masked.contains(&raw), "{} -> {}", value, masked);
            proptest::prop_assert!(!masked.contains(&enc), "{} -> {}", value, masked);
        }
    }
}
