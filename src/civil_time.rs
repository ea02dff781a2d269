//! Calendar time (UTC, the proleptic Gregorian calendar) from seconds
//! since the Unix epoch: what the CMOS RTC shows and `snapshot ls` prints.

/// A calendar time, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday ... 7 = Saturday, as the RTC counts.
    pub weekday: u8,
}

impl CivilTime {
    /// The UTC calendar time `secs` seconds after the Unix epoch (days
    /// counted in 400-year eras of 146,097 days, March-based years so that
    /// the leap day falls last, after Howard Hinnant's "chrono-compatible
    /// low-level date algorithms").
    pub fn from_unix(secs: i64) -> CivilTime {
        let days = secs.div_euclid(86_400);
        let of_day = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        CivilTime {
            year,
            month: month as u8,
            day: day as u8,
            hour: (of_day / 3600) as u8,
            minute: (of_day / 60 % 60) as u8,
            second: (of_day % 60) as u8,
            // 1970-01-01 was a Thursday (5 when Sunday is 1).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }
}

impl std::fmt::Display for CivilTime {
    /// `YYYY-MM-DD HH:MM:SSZ`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03 14:05:09 UTC, a Thursday.
    const FIXED: i64 = 1_796_306_709;

    #[test]
    fn civil_time_matches_known_dates() {
        let t = |y, mo, d, h, mi, s, wd| CivilTime {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
            second: s,
            weekday: wd,
        };
        assert_eq!(CivilTime::from_unix(0), t(1970, 1, 1, 0, 0, 0, 5));
        assert_eq!(CivilTime::from_unix(FIXED), t(2026, 12, 3, 14, 5, 9, 5));
        // A leap day, and the day after it.
        assert_eq!(
            CivilTime::from_unix(951_782_400),
            t(2000, 2, 29, 0, 0, 0, 3)
        );
        assert_eq!(
            CivilTime::from_unix(951_868_799),
            t(2000, 2, 29, 23, 59, 59, 3)
        );
        assert_eq!(CivilTime::from_unix(951_868_800), t(2000, 3, 1, 0, 0, 0, 4));
        // 2100 is not a leap year.
        assert_eq!(
            CivilTime::from_unix(4_107_542_400),
            t(2100, 3, 1, 0, 0, 0, 2)
        );
        // Before the epoch.
        assert_eq!(CivilTime::from_unix(-1), t(1969, 12, 31, 23, 59, 59, 4));
    }

    #[test]
    fn civil_time_walks_every_day_of_four_centuries_in_order() {
        let mut last = CivilTime::from_unix(-86_400 * 146_097);
        for day in -146_096..146_097i64 {
            let now = CivilTime::from_unix(day * 86_400);
            let next_day = now.day == last.day + 1 && now.month == last.month;
            let next_month = now.day == 1 && (now.month == last.month % 12 + 1);
            assert!(next_day || next_month, "{last:?} then {now:?}");
            if now.month == 1 && now.day == 1 {
                assert_eq!(now.year, last.year + 1);
            }
            assert_eq!(now.weekday, last.weekday % 7 + 1);
            last = now;
        }
    }

    #[test]
    fn displays_as_snapshot_ls_prints_it() {
        assert_eq!(CivilTime::from_unix(0).to_string(), "1970-01-01 00:00:00Z");
        assert_eq!(
            CivilTime::from_unix(4_107_542_399).to_string(),
            "2100-02-28 23:59:59Z"
        );
    }
}
