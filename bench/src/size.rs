//! Byte sizes on the command line and in tables: parsing `4KiB`, `1MiB`, `1GiB`, `128M`
//! (binary multiples; `K`, `M`, `G` and `KB`… are binary too, as fio reads them) and
//! formatting a byte count back into the largest exact unit.

/// Parses a byte count such as `4096`, `4KiB`, `4k`, `1MiB`, `1G`. Units are powers of 1024.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count (e.g. 4096, 4KiB, 1MiB, 1GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}` (use KiB, MiB, GiB)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{text}` overflows 64 bits"))
}

/// Formats a byte count in the largest binary unit that divides it exactly (`4KiB`,
/// `128MiB`), or in bytes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, name) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("4KiB").unwrap(), 4096);
        assert_eq!(parse_bytes("4k").unwrap(), 4096);
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("128M").unwrap(), 128 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert!(parse_bytes("1.5GiB").is_err());
        assert!(parse_bytes("12parsecs").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn formats_exact_units() {
        assert_eq!(format_bytes(4096), "4KiB");
        assert_eq!(format_bytes(128 << 20), "128MiB");
        assert_eq!(format_bytes(1 << 30), "1GiB");
        assert_eq!(format_bytes(1000), "1000B");
        assert_eq!(format_bytes(1536), "1536B");
    }
}
