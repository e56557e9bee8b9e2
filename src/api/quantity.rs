//! Kubernetes resource quantities (`100m`, `1.5`, `64Mi`, `1G`, `1e3`), as the scheduler and
//! validation read them.
//!
//! A quantity is a decimal number with an optional suffix: binary (`Ki` … `Ei`), decimal
//! (`n`, `u`, `m`, `k`, `M`, `G`, `T`, `P`, `E`) or a decimal exponent (`e3`, `E-2`). Values
//! are kept in thousandths (milli-units) as `i128`, rounded up, as the Go type does for
//! `MilliValue`.

/// The value of `s` in milli-units, or `None` if it is not a quantity.
pub fn parse_milli(s: &str) -> Option<i128> {
    let s = s.trim();
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    let (sign, body) = match s.as_bytes()[0] {
        b'-' => (-1, &s[1..]),
        b'+' => (1, &s[1..]),
        _ => (1, s),
    };
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, suffix) = body.split_at(split);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return None;
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    // mantissa = digits as an integer, scaled down by 10^frac_len.
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return None;
    }
    let mantissa: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let mut exp10: i32 = -(frac_part.len() as i32);
    let mut binary: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => binary = 10,
        "Mi" => binary = 20,
        "Gi" => binary = 30,
        "Ti" => binary = 40,
        "Pi" => binary = 50,
        "Ei" => binary = 60,
        e if e.starts_with(['e', 'E']) => {
            let n: i32 = e[1..].parse().ok()?;
            if !(-30..=30).contains(&n) {
                return None;
            }
            exp10 += n;
        }
        _ => return None,
    }
    // In milli-units: one more factor of 10^3.
    exp10 += 3;
    let mut v = mantissa.checked_mul(1i128.checked_shl(binary)?)?;
    if exp10 >= 0 {
        v = v.checked_mul(10i128.checked_pow(exp10 as u32)?)?;
    } else {
        let d = 10i128.checked_pow((-exp10) as u32)?;
        v = (v + d - 1) / d; // round up
    }
    Some(sign * v)
}

/// The value of `s` in whole units, rounded up.
pub fn parse_units(s: &str) -> Option<i128> {
    parse_milli(s).map(|m| (m + 999).div_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_kubernetes_reads_them() {
        assert_eq!(parse_milli("100m"), Some(100));
        assert_eq!(parse_milli("1"), Some(1000));
        assert_eq!(parse_milli("1.5"), Some(1500));
        assert_eq!(parse_milli("0.1"), Some(100));
        assert_eq!(parse_milli("2k"), Some(2_000_000));
        assert_eq!(parse_units("64Mi"), Some(64 * 1024 * 1024));
        assert_eq!(parse_units("1Gi"), Some(1 << 30));
        assert_eq!(parse_units("1G"), Some(1_000_000_000));
        assert_eq!(parse_units("1e3"), Some(1000));
        assert_eq!(parse_units("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_milli("1u"), Some(1), "rounded up to a milli-unit");
        assert_eq!(parse_milli("-1"), Some(-1000));
        for bad in ["", "abc", "1..2", "1Zi", "Mi", "1e", "1e99", ".", "1 2"] {
            assert_eq!(parse_milli(bad), None, "{bad:?}");
        }
    }
}
