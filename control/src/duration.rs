//! Durations as Istio and the Gateway API write them: `10s`, `1.5s`, `250ms`, `1h30m`.

use std::time::Duration;

/// Longest duration accepted anywhere in config: nothing in a data plane waits longer.
pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

pub fn parse(input: &str) -> Result<Duration, String> {
    let bad = || format!("{input:?} is not a duration; write e.g. 10s, 1.5s, 250ms or 1h30m");
    if input.is_empty() {
        return Err(bad());
    }
    let mut rest = input;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if number_len == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    if !total.is_finite() || total > MAX.as_secs_f64() {
        return Err(format!(
            "{input:?} is longer than the limit of {} hours",
            MAX.as_secs() / 3600
        ));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            ("10s", 10_000),
            ("1.5s", 1_500),
            ("250ms", 250),
            ("1h30m", 5_400_000),
            ("0s", 0),
            ("2m", 120_000),
        ];
        for (text, ms) in ok {
            assert_eq!(parse(text).map(|d| d.as_millis()), Ok(ms), "{text}");
        }
        for text in ["", "10", "s", "10 s", "-1s", "1.2.3s", "10x", "9999h"] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
