//! timestamp / timestamptz text: PostgreSQL's ISO output in, the message's ISO form out, and the
//! instant as microseconds since the Unix epoch for ClickHouse.
//!
//! Calendar: proleptic Gregorian with astronomical years (1 BC = year 0), as PostgreSQL computes.

/// A parsed timestamp: an instant (UTC for timestamptz, wall-clock for timestamp) or ±infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stamp {
    NegInfinity,
    /// Microseconds since 1970-01-01 00:00:00. i128 so no year PostgreSQL accepts can overflow it.
    At(i128),
    Infinity,
}

const MICROS_PER_DAY: i128 = 86_400_000_000;

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]` (PostgreSQL's ISO DateStyle) and the
/// message's own `[-]YYYY-MM-DDTHH:MM:SS[.ffffff][Z]`. `zoned` says whether the type carries an offset:
/// timestamptz must have one (the session's TimeZone is not assumed), timestamp must not.
pub(crate) fn parse(text: &str, zoned: bool) -> Result<Stamp, String> {
    match text {
        "infinity" | "+infinity" => return Ok(Stamp::Infinity),
        "-infinity" => return Ok(Stamp::NegInfinity),
        _ => {}
    }
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let (text, negative_year) = match text.strip_prefix('-') {
        Some(t) => (t, true),
        None => (text, false),
    };
    if bc && negative_year {
        return Err("both a minus sign and BC".into());
    }
    let (date, rest) = text.split_once([' ', 'T']).ok_or("no time part")?;
    let mut d = date.split('-');
    let (Some(y), Some(m), Some(day), None) = (d.next(), d.next(), d.next(), d.next()) else {
        return Err("date is not YYYY-MM-DD".into());
    };
    let year = digits(y, 4, 9)?;
    let month = digits(m, 2, 2)?;
    let day = digits(day, 2, 2)?;
    let year = if bc {
        1 - year
    } else if negative_year {
        -year
    } else {
        year
    };

    // The time runs up to the fraction's end; what follows is the zone.
    let zone_at = rest.find(['+', '-', 'Z']).unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(zone_at);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.split(':');
    let (Some(h), Some(mi), Some(s), None) = (t.next(), t.next(), t.next(), t.next()) else {
        return Err("time is not HH:MM:SS".into());
    };
    let (h, mi, s) = (digits(h, 2, 2)?, digits(mi, 2, 2)?, digits(s, 2, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err("no such date".into());
    }
    if h > 23 || mi > 59 || s > 59 {
        return Err("no such time of day".into());
    }
    let micros = if frac.is_empty() {
        0
    } else {
        digits(frac, 1, 6)? * 10i64.pow(6 - frac.len() as u32)
    };

    let offset_secs = match (zone, zoned) {
        ("", false) => 0,
        ("", true) => return Err("timestamptz text without a UTC offset".into()),
        (_, false) => return Err("timestamp without time zone has an offset".into()),
        ("Z", true) => 0,
        (z, true) => parse_offset(z)?,
    };
    let days = days_from_civil(year, month, day);
    let local = i128::from(days) * MICROS_PER_DAY
        + i128::from(((h * 60 + mi) * 60 + s) * 1_000_000 + micros);
    Ok(Stamp::At(local - i128::from(offset_secs) * 1_000_000))
}

/// `+05`, `-08:00`, `+05:30:15` → seconds east of UTC.
fn parse_offset(z: &str) -> Result<i64, String> {
    let (sign, rest) = match z.split_at_checked(1) {
        Some(("+", r)) => (1, r),
        Some(("-", r)) => (-1, r),
        _ => return Err("bad UTC offset".into()),
    };
    let mut parts = rest.split(':');
    let h = parts
        .next()
        .map(|p| digits(p, 2, 2))
        .transpose()?
        .unwrap_or(0);
    let m = parts
        .next()
        .map(|p| digits(p, 2, 2))
        .transpose()?
        .unwrap_or(0);
    let s = parts
        .next()
        .map(|p| digits(p, 2, 2))
        .transpose()?
        .unwrap_or(0);
    if parts.next().is_some() || h > 15 || m > 59 || s > 59 {
        return Err("bad UTC offset".into());
    }
    Ok(sign * (h * 3600 + m * 60 + s))
}

/// ASCII digits only, `min..=max` of them (so `+1`, ` 1` and 20-digit overflows are refused).
fn digits(s: &str, min: usize, max: usize) -> Result<i64, String> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected {min} to {max} digits, got {s:?}"));
    }
    s.parse().map_err(|_| format!("not a number: {s:?}"))
}

/// The message form: `YYYY-MM-DDTHH:MM:SS[.ffffff]`, plus `Z` for timestamptz. Years before 1 AD
/// are astronomical with a minus sign (`-0043` is 44 BC), after 9999 they get more digits.
pub(crate) fn format_iso(stamp: Stamp, zoned: bool) -> String {
    let micros = match stamp {
        Stamp::Infinity => return "infinity".into(),
        Stamp::NegInfinity => return "-infinity".into(),
        Stamp::At(m) => m,
    };
    let (days, in_day) = (
        micros.div_euclid(MICROS_PER_DAY),
        micros.rem_euclid(MICROS_PER_DAY),
    );
    let (y, mo, d) = civil_from_days(days);
    let year = if y < 0 {
        format!("-{:04}", -y)
    } else {
        format!("{y:04}")
    };
    let (secs, frac) = (in_day / 1_000_000, in_day % 1_000_000);
    let mut s = format!(
        "{year}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    if frac != 0 {
        s.push_str(&format!(".{frac:06}"));
    }
    if zoned {
        s.push('Z');
    }
    s
}

fn is_leap(y: i64) -> bool {
    y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm; exact for any i64 year we accept).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count (the inverse of [`days_from_civil`]): year, month, day.
pub(crate) fn civil_from_days(z: i128) -> (i128, i128, i128) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i128::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso(text: &str, zoned: bool) -> String {
        format_iso(parse(text, zoned).unwrap(), zoned)
    }

    #[test]
    fn naive_timestamps() {
        assert_eq!(parse("1970-01-01 00:00:00", false), Ok(Stamp::At(0)));
        assert_eq!(
            iso("2024-02-29 23:59:59.5", false),
            "2024-02-29T23:59:59.500000"
        );
        assert_eq!(
            iso("2024-01-01 10:00:00.000001", false),
            "2024-01-01T10:00:00.000001"
        );
        assert_eq!(iso("0044-03-15 12:00:00 BC", false), "-0043-03-15T12:00:00");
        assert_eq!(iso("0001-01-01 00:00:00 BC", false), "0000-01-01T00:00:00");
        assert_eq!(
            iso("294276-12-31 23:59:59.999999", false),
            "294276-12-31T23:59:59.999999"
        );
        assert_eq!(iso("4714-11-24 00:00:00 BC", false), "-4713-11-24T00:00:00");
        assert_eq!(iso("infinity", false), "infinity");
        assert_eq!(iso("-infinity", false), "-infinity");
        // Our own output parses back to the same instant.
        for t in [
            "-0043-03-15T12:00:00",
            "2024-02-29T23:59:59.500000",
            "0000-01-01T00:00:00",
        ] {
            assert_eq!(iso(t, false), t);
        }
    }

    #[test]
    fn zoned_timestamps_become_utc() {
        assert_eq!(iso("2024-01-01 10:00:00+02", true), "2024-01-01T08:00:00Z");
        assert_eq!(
            iso("2024-01-01 00:10:00+05:30", true),
            "2023-12-31T18:40:00Z"
        );
        assert_eq!(
            iso("2024-01-01 00:00:00+05:30:15", true),
            "2023-12-31T18:29:45Z"
        );
        assert_eq!(
            iso("2023-12-31 23:00:00.25-01", true),
            "2024-01-01T00:00:00.250000Z"
        );
        assert_eq!(
            iso("0001-01-01 00:00:00+00 BC", true),
            "0000-01-01T00:00:00Z"
        );
        assert_eq!(iso("2024-01-01T08:00:00Z", true), "2024-01-01T08:00:00Z");
        assert_eq!(iso("infinity", true), "infinity");
    }

    #[test]
    fn malformed_is_an_error() {
        for (bad, zoned) in [
            ("2024-01-01 10:00:00", true),
            ("2024-01-01 10:00:00+02", false),
            ("2024-02-30 10:00:00", false),
            ("2023-02-29 10:00:00", false),
            ("2024-13-01 10:00:00", false),
            ("2024-01-01 24:00:00", false),
            ("2024-01-01", false),
            ("2024-01-01 10:00", false),
            ("2024-01-01 10:00:00.1234567", false),
            ("2024-01-01 10:00:00+2", true),
            ("-2024-01-01 10:00:00 BC", false),
            ("99999999999-01-01 00:00:00", false),
            ("2024-01-01 10:00:00+", true),
            ("", false),
            ("é", true),
        ] {
            assert!(parse(bad, zoned).is_err(), "{bad:?} parsed");
        }
    }
}
