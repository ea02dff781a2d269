//! Byte sizes as users type them: `512M`, `2G`, `10GiB`, `4096`.
//!
//! Suffixes are binary (K = 1024), as in QEMU and qemu-img, because memory
//! and disk sizes in labs are always meant that way.

use std::fmt;
use std::str::FromStr;

/// A size in bytes parsed from a human spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeParseError {
    #[error("empty size: give a number with an optional K, M, G or T suffix, e.g. 512M")]
    Empty,
    #[error(
        "invalid size '{0}': use a number with an optional K, M, G or T suffix, e.g. 512M or 2G"
    )]
    Invalid(String),
    #[error("size '{0}' is too large")]
    Overflow(String),
}

impl ByteSize {
    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;
    pub const TIB: u64 = 1 << 40;

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = SizeParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        if s.is_empty() {
            return Err(SizeParseError::Empty);
        }
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, suffix) = s.split_at(digits_end);
        if number.is_empty() {
            return Err(SizeParseError::Invalid(text.to_string()));
        }
        let multiplier = match suffix.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "m" | "mb" | "mib" => Self::MIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::TIB,
            _ => return Err(SizeParseError::Invalid(text.to_string())),
        };
        let value: u64 = number
            .parse()
            .map_err(|_| SizeParseError::Overflow(text.to_string()))?;
        value
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| SizeParseError::Overflow(text.to_string()))
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest exact binary unit, so `ByteSize(512 << 20)` is `512M`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (Self::TIB, "T"),
            (Self::GIB, "G"),
            (Self::MIB, "M"),
            (Self::KIB, "K"),
        ];
        for (unit, name) in units {
            if self.0 >= unit && self.0 % unit == 0 {
                return write!(f, "{}{}", self.0 / unit, name);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes_as_binary_units() {
        assert_eq!("512M".parse::<ByteSize>().unwrap().bytes(), 512 << 20);
        assert_eq!("2G".parse::<ByteSize>().unwrap().bytes(), 2 << 30);
        assert_eq!("2g".parse::<ByteSize>().unwrap().bytes(), 2 << 30);
        assert_eq!("10GiB".parse::<ByteSize>().unwrap().bytes(), 10 << 30);
        assert_eq!("4k".parse::<ByteSize>().unwrap().bytes(), 4096);
        assert_eq!("1T".parse::<ByteSize>().unwrap().bytes(), 1 << 40);
    }

    #[test]
    fn parses_plain_bytes() {
        assert_eq!("4096".parse::<ByteSize>().unwrap().bytes(), 4096);
        assert_eq!(" 7 ".parse::<ByteSize>().unwrap().bytes(), 7);
        assert_eq!("0".parse::<ByteSize>().unwrap().bytes(), 0);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!("".parse::<ByteSize>(), Err(SizeParseError::Empty));
        for bad in ["M", "12X", "1.5G", "-1G", "G12", "12 M B"] {
            assert!(
                matches!(bad.parse::<ByteSize>(), Err(SizeParseError::Invalid(_))),
                "{bad} should be invalid"
            );
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(matches!(
            "99999999999999999999".parse::<ByteSize>(),
            Err(SizeParseError::Overflow(_))
        ));
        assert!(matches!(
            "17179869184T".parse::<ByteSize>(),
            Err(SizeParseError::Overflow(_))
        ));
    }

    #[test]
    fn displays_largest_exact_unit() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        assert_eq!(ByteSize(2 << 30).to_string(), "2G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
