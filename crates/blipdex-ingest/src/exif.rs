//! What a photo's EXIF block says about it (date taken, camera, location), read at ingest into
//! [`PhotoMeta`]. Metadata is a nicety: a photo without EXIF, or with a block that does not
//! parse, is indexed all the same with the fields that could not be read left empty.

use std::io::Cursor;

use ::exif::{Exif, In, Rational, Reader, Tag, Value};
use blipdex_store::PhotoMeta;

/// Largest offset from UTC in use (UTC+14:00, Kiribati; the most negative is UTC-12:00). Anything
/// beyond is a corrupt tag, not a time zone.
const MAX_OFFSET_MIN: i16 = 14 * 60;

/// The EXIF metadata of an encoded photo (JPEG, PNG `eXIf`, WebP, TIFF, HEIF/AVIF; other formats
/// have none). Never fails: what is missing or unreadable stays `None`. A block that is partly
/// corrupt keeps the fields that parsed.
pub fn photo_meta(bytes: &[u8]) -> PhotoMeta {
    // kamadak-exif checks its bounds, but it parses untrusted files: a bug in it must cost one
    // photo its metadata, not stop the ingest.
    std::panic::catch_unwind(|| read(bytes)).unwrap_or_else(|_| {
        tracing::debug!("the EXIF parser panicked; ignoring this photo's metadata");
        PhotoMeta::default()
    })
}

fn read(bytes: &[u8]) -> PhotoMeta {
    let parsed = Reader::new()
        .continue_on_error(true)
        .read_from_container(&mut Cursor::new(bytes))
        .or_else(|e| {
            e.distill_partial_result(|errors| {
                tracing::debug!(
                    errors = errors.len(),
                    first = %errors.first().map(ToString::to_string).unwrap_or_default(),
                    "EXIF block partly unreadable; keeping the fields that parsed"
                );
            })
        });
    match parsed {
        Ok(exif) => from_exif(&exif),
        // No EXIF at all: the common case, nothing to say.
        Err(::exif::Error::NotFound(_)) => PhotoMeta::default(),
        Err(e) => {
            tracing::debug!(error = %e, "unreadable EXIF block; ignoring it");
            PhotoMeta::default()
        }
    }
}

fn from_exif(exif: &Exif) -> PhotoMeta {
    let value = |tag| exif.get_field(tag, In::PRIMARY).map(|f| &f.value);
    let text = |tag| value(tag).and_then(ascii);

    let taken_at = text(Tag::DateTimeOriginal)
        .and_then(|s| parse_datetime(&s))
        .or_else(|| text(Tag::DateTimeDigitized).and_then(|s| parse_datetime(&s)));
    // An offset says where a time was taken; without a time it says nothing.
    let taken_offset_min = taken_at.and_then(|_| {
        text(Tag::OffsetTimeOriginal)
            .and_then(|s| parse_offset(&s))
            .or_else(|| text(Tag::OffsetTimeDigitized).and_then(|s| parse_offset(&s)))
    });

    let coordinate = |tag, ref_tag, positive, negative, limit| match (value(tag), text(ref_tag)) {
        (Some(Value::Rational(dms)), Some(r)) => degrees(dms, &r, positive, negative, limit),
        _ => None,
    };
    let lat = coordinate(Tag::GPSLatitude, Tag::GPSLatitudeRef, 'N', 'S', 90.0);
    let lon = coordinate(Tag::GPSLongitude, Tag::GPSLongitudeRef, 'E', 'W', 180.0);
    // Half a coordinate places nothing, and a filter on one axis would match it wrongly.
    let (gps_lat, gps_lon) = match (lat, lon) {
        (Some(lat), Some(lon)) => (Some(lat), Some(lon)),
        _ => (None, None),
    };

    PhotoMeta {
        taken_at,
        taken_offset_min,
        camera_make: text(Tag::Make),
        camera_model: text(Tag::Model),
        gps_lat,
        gps_lon,
    }
}

/// An ASCII tag's text: the first of its NUL-separated strings that is not blank once NULs and
/// whitespace are trimmed (cameras pad fixed-width fields with both). Stray non-ASCII bytes are
/// replaced rather than dropping the field.
fn ascii(value: &Value) -> Option<String> {
    let Value::Ascii(strings) = value else {
        return None;
    };
    strings
        .iter()
        .map(|s| trim(&String::from_utf8_lossy(s)).to_string())
        .find(|s| !s.is_empty())
}

fn trim(s: &str) -> &str {
    s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
}

/// An EXIF date-time, `"YYYY:MM:DD HH:MM:SS"` (dashes in the date and a `T` are accepted too),
/// as seconds from 1970-01-01T00:00:00 to that wall-clock time. Anything after the seconds
/// (subseconds, a zone some writers append) is ignored. `None` for blank or impossible dates,
/// such as the zeros of a camera whose clock was never set.
fn parse_datetime(s: &str) -> Option<i64> {
    let b = trim(s).as_bytes();
    if b.len() < 19
        || !matches!(b[4], b':' | b'-')
        || b[7] != b[4]
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(r)?;
        digits.iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let valid = year >= 1
        && (1..=12).contains(&month)
        && day >= 1
        && day <= days_in_month(year, month)
        && hour <= 23
        && minute <= 59
        && second <= 59;
    valid.then(|| days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An EXIF offset, `"+HH:MM"` or `"-HH:MM"`, in minutes east of UTC; `None` when blank or
/// outside the offsets in use.
fn parse_offset(s: &str) -> Option<i16> {
    let b = trim(s).as_bytes();
    if b.len() != 6 || b[3] != b':' {
        return None;
    }
    let two = |i: usize| -> Option<i16> {
        let (t, u) = (b[i], b[i + 1]);
        (t.is_ascii_digit() && u.is_ascii_digit())
            .then(|| i16::from(t - b'0') * 10 + i16::from(u - b'0'))
    };
    let (hours, minutes) = (two(1)?, two(4)?);
    if minutes > 59 {
        return None;
    }
    let offset = hours * 60 + minutes;
    let signed = match b[0] {
        b'+' => offset,
        b'-' => -offset,
        _ => return None,
    };
    (signed.abs() <= MAX_OFFSET_MIN).then_some(signed)
}

/// GPS degrees/minutes/seconds rationals and their reference letter → signed decimal degrees
/// (`negative` hemisphere below zero). Writers that store decimal degrees or minutes use fewer
/// than three rationals, which add up the same. `None` for a reference that is neither letter,
/// a zero denominator, or a result beyond ±`limit`.
fn degrees(
    dms: &[Rational],
    reference: &str,
    positive: char,
    negative: char,
    limit: f64,
) -> Option<f64> {
    if dms.is_empty() || dms.len() > 3 {
        return None;
    }
    let sign = match trim(reference).to_ascii_uppercase().as_str() {
        r if r.len() == 1 && r.starts_with(positive) => 1.0,
        r if r.len() == 1 && r.starts_with(negative) => -1.0,
        _ => return None,
    };
    let mut value = 0.0;
    for (r, scale) in dms.iter().zip([1.0, 60.0, 3600.0]) {
        if r.denom == 0 {
            return None;
        }
        value += f64::from(r.num) / f64::from(r.denom) / scale;
    }
    (value <= limit).then_some(sign * value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(num: u32, denom: u32) -> Rational {
        Rational { num, denom }
    }

    #[test]
    fn dms_with_references_become_signed_degrees() {
        let oslo = [r(59, 1), r(54, 1), r(50_040, 1000)];
        let lat = degrees(&oslo, "N", 'N', 'S', 90.0).expect("north");
        assert!((lat - 59.9139).abs() < 1e-9, "{lat}");
        let south = degrees(&oslo, "S", 'N', 'S', 90.0).expect("south");
        assert_eq!(south, -lat);
        let west = degrees(&[r(58, 1), r(22, 1), r(53_760, 1000)], "W", 'E', 'W', 180.0);
        assert!((west.expect("west") + 58.3816).abs() < 1e-9);
        // Decimal degrees in one rational, a lowercase or padded reference.
        assert_eq!(
            degrees(&[r(1_512_093, 10_000)], " e\0", 'E', 'W', 180.0),
            Some(151.2093)
        );
    }

    #[test]
    fn unplaceable_coordinates_are_none() {
        let dms = [r(10, 1), r(0, 1), r(0, 1)];
        assert_eq!(degrees(&dms, "", 'N', 'S', 90.0), None, "missing reference");
        assert_eq!(
            degrees(&dms, "E", 'N', 'S', 90.0),
            None,
            "longitude reference on a latitude"
        );
        assert_eq!(degrees(&dms, "NS", 'N', 'S', 90.0), None);
        assert_eq!(
            degrees(&[r(95, 1)], "N", 'N', 'S', 90.0),
            None,
            "out of range"
        );
        assert_eq!(degrees(&[r(180, 1), r(1, 1)], "W", 'E', 'W', 180.0), None);
        assert_eq!(
            degrees(&[r(10, 0)], "N", 'N', 'S', 90.0),
            None,
            "zero denominator"
        );
        assert_eq!(degrees(&[], "N", 'N', 'S', 90.0), None);
        assert_eq!(
            degrees(&[r(90, 1)], "S", 'N', 'S', 90.0),
            Some(-90.0),
            "the pole is fine"
        );
    }

    #[test]
    fn datetimes_are_wall_clock_seconds() {
        assert_eq!(parse_datetime("1970:01:01 00:00:00"), Some(0));
        assert_eq!(parse_datetime("2024:05:01 12:34:56"), Some(1_714_566_896));
        assert_eq!(
            parse_datetime("2024:02:29 06:30:00"),
            Some(1_709_188_200),
            "leap day"
        );
        assert_eq!(parse_datetime("1969:12:31 23:59:59"), Some(-1));
        assert_eq!(parse_datetime("2000:03:01 00:00:00"), Some(951_868_800));
        // Tolerated variants: trailing NUL/space, dashes, a T, subseconds and a zone after.
        assert_eq!(
            parse_datetime("2024:05:01 12:34:56\0 "),
            Some(1_714_566_896)
        );
        assert_eq!(parse_datetime("2024-05-01T12:34:56"), Some(1_714_566_896));
        assert_eq!(
            parse_datetime("2024:05:01 12:34:56.250+02:00"),
            Some(1_714_566_896)
        );
    }

    #[test]
    fn impossible_or_blank_datetimes_are_none() {
        for s in [
            "0000:00:00 00:00:00",
            "    :  :     :  :  ",
            "",
            "2024:05:01",
            "2024:13:01 00:00:00",
            "2023:02:29 00:00:00",
            "1900:02:29 00:00:00",
            "2024:04:31 00:00:00",
            "2024:05:01 24:00:00",
            "2024:05:01 12:60:00",
            "2024:05:01 12:00:60",
            "2024/05/01 12:34:56",
            "2024:05-01 12:34:56",
            "2024:05:01 12:3x:56",
            "+024:05:01 12:34:56",
        ] {
            assert_eq!(parse_datetime(s), None, "{s:?}");
        }
    }

    #[test]
    fn offsets_are_minutes_east_of_utc() {
        assert_eq!(parse_offset("+02:00"), Some(120));
        assert_eq!(parse_offset("-05:30"), Some(-330));
        assert_eq!(parse_offset("+00:00"), Some(0));
        assert_eq!(parse_offset("+14:00"), Some(840));
        assert_eq!(parse_offset("+05:45\0"), Some(345));
        for s in [
            "   :  ", "", "02:00", "+2:00", "+02:60", "+15:00", "*02:00", "+02-00", "+02:000",
        ] {
            assert_eq!(parse_offset(s), None, "{s:?}");
        }
    }

    #[test]
    fn text_is_trimmed_of_padding() {
        let v = |parts: &[&[u8]]| Value::Ascii(parts.iter().map(|p| p.to_vec()).collect());
        assert_eq!(ascii(&v(&[b"Canon"])).as_deref(), Some("Canon"));
        assert_eq!(ascii(&v(&[b"SONY   ", b"", b""])).as_deref(), Some("SONY"));
        assert_eq!(
            ascii(&v(&[b"  ", b" ILCE-7M3 "])).as_deref(),
            Some("ILCE-7M3")
        );
        assert_eq!(ascii(&v(&[b" \t", b""])), None);
        assert_eq!(ascii(&v(&[])), None);
        assert_eq!(ascii(&v(&[b"Caf\xe9"])).as_deref(), Some("Caf\u{fffd}"));
        assert_eq!(ascii(&Value::Short(vec![1])), None);
    }

    #[test]
    fn bytes_without_exif_give_nothing() {
        assert_eq!(photo_meta(b""), PhotoMeta::default());
        assert_eq!(photo_meta(b"not an image"), PhotoMeta::default());
        assert_eq!(
            photo_meta(&[0xFF, 0xD8, 0xFF, 0xE1, 0xFF]),
            PhotoMeta::default()
        );
        // A TIFF header whose IFD lies past the end.
        assert_eq!(photo_meta(b"II*\0\xff\xff\xff\x00"), PhotoMeta::default());
    }
}
