//! Filters on what a photo's EXIF says (when, which camera, where) and the orders a search can
//! return its hits in. They apply before top-k: the matching images are found first by a scan
//! of the snapshot's metadata table (in memory after the first filtered search), then scored.

use blipdex_core::{Error, Result};
use blipdex_store::PhotoMeta;
use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use serde::{Deserialize, Serialize};

/// Mean Earth radius (IUGG), for great-circle distances.
const EARTH_RADIUS_KM: f64 = 6371.0088;

/// A circle on the Earth's surface.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Near {
    /// Degrees, -90..=90.
    pub lat: f64,
    /// Degrees, -180..=180.
    pub lon: f64,
    /// Kilometres, > 0.
    pub radius_km: f64,
}

/// Conditions on EXIF metadata; every one given must hold. Images whose metadata was never
/// read or lacks the field fail a condition on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PhotoFilter {
    /// Taken at or after this wall-clock time (seconds, see [`PhotoMeta::taken_at`]).
    pub taken_after: Option<i64>,
    /// Taken before this wall-clock time (exclusive).
    pub taken_before: Option<i64>,
    /// Case-insensitive substring of "make model".
    pub camera: Option<String>,
    pub near: Option<Near>,
    /// With (`true`) or without (`false`) a GPS location.
    pub has_location: Option<bool>,
}

impl std::str::FromStr for SortBy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "" | "score" => Ok(Self::Score),
            "date_desc" | "newest" => Ok(Self::DateDesc),
            "date_asc" | "oldest" => Ok(Self::DateAsc),
            _ => Err(Error::InvalidArgument(format!(
                "sort is {s:?}; use score, date_desc or date_asc"
            ))),
        }
    }
}

/// The order of a search's hits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    /// Best score first (ties by image id).
    #[default]
    Score,
    /// Newest photo first; photos without a date last.
    DateDesc,
    /// Oldest photo first; photos without a date last.
    DateAsc,
}

impl PhotoFilter {
    /// The filter as front ends receive it (empty strings: no condition), checked.
    pub fn parse(
        taken_after: &str,
        taken_before: &str,
        camera: &str,
        near: Option<Near>,
        has_location: Option<bool>,
    ) -> Result<Self> {
        let when = |s: &str, end, field| {
            (!s.trim().is_empty())
                .then(|| parse_wall_clock(s, end, field))
                .transpose()
        };
        let f = Self {
            taken_after: when(taken_after, DayEnd::Start, "taken_after")?,
            taken_before: when(taken_before, DayEnd::NextDay, "taken_before")?,
            camera: Some(camera.trim().to_string()).filter(|c| !c.is_empty()),
            near,
            has_location,
        };
        f.validate()?;
        Ok(f)
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        if let (Some(a), Some(b)) = (self.taken_after, self.taken_before) {
            if a >= b {
                return Err(Error::InvalidArgument(format!(
                    "taken_after ({}) is not before taken_before ({})",
                    format_wall_clock(a),
                    format_wall_clock(b)
                )));
            }
        }
        if let Some(n) = &self.near {
            let ok = (-90.0..=90.0).contains(&n.lat)
                && (-180.0..=180.0).contains(&n.lon)
                && n.radius_km.is_finite()
                && n.radius_km > 0.0;
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "near must have lat in -90..90, lon in -180..180 and radius_km > 0, got \
                     lat {} lon {} radius_km {}",
                    n.lat, n.lon, n.radius_km
                )));
            }
        }
        if self.camera.as_ref().is_some_and(|c| c.len() > 256) {
            return Err(Error::InvalidArgument(
                "camera is over 256 bytes; give part of the make or model".into(),
            ));
        }
        Ok(())
    }

    /// Whether an image with this metadata passes.
    pub fn matches(&self, meta: Option<&PhotoMeta>) -> bool {
        if self.is_empty() {
            return true;
        }
        let empty = PhotoMeta::default();
        let m = meta.unwrap_or(&empty);
        if let Some(after) = self.taken_after {
            if m.taken_at.is_none_or(|t| t < after) {
                return false;
            }
        }
        if let Some(before) = self.taken_before {
            if m.taken_at.is_none_or(|t| t >= before) {
                return false;
            }
        }
        if let Some(want) = &self.camera {
            let make = m.camera_make.as_deref().unwrap_or("");
            let model = m.camera_model.as_deref().unwrap_or("");
            if !camera_contains(make, model, want) {
                return false;
            }
        }
        if let Some(want) = self.has_location {
            if m.location().is_some() != want {
                return false;
            }
        }
        if let Some(n) = &self.near {
            match m.location() {
                Some((lat, lon)) if distance_km(n.lat, n.lon, lat, lon) <= n.radius_km => {}
                _ => return false,
            }
        }
        true
    }
}

/// What the index's photos hold, for a filter form: cameras (most photos first), the range of
/// dates, how many have a location.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Facets {
    pub images: usize,
    /// (camera, photos), most photos first, then by name.
    pub cameras: Vec<(String, usize)>,
    pub taken_min: Option<i64>,
    pub taken_max: Option<i64>,
    pub with_date: usize,
    pub with_location: usize,
    /// Images whose EXIF was never read (indexed before blipdex read it; the next ingest
    /// reads it).
    pub not_read: usize,
}

/// One pass over the snapshot's metadata table.
pub fn facets(store: &blipdex_store::Store) -> Result<Facets> {
    let mut f = Facets::default();
    let mut cameras: std::collections::HashMap<String, usize> = Default::default();
    for (_, m) in store.photos()? {
        f.images += 1;
        let Some(m) = m else {
            f.not_read += 1;
            continue;
        };
        if let Some(c) = m.camera() {
            *cameras.entry(c).or_default() += 1;
        }
        if let Some(t) = m.taken_at {
            f.with_date += 1;
            f.taken_min = Some(f.taken_min.map_or(t, |x| x.min(t)));
            f.taken_max = Some(f.taken_max.map_or(t, |x| x.max(t)));
        }
        if m.location().is_some() {
            f.with_location += 1;
        }
    }
    f.cameras = cameras.into_iter().collect();
    f.cameras
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(f)
}

/// Whether "make model" contains `want`, ignoring case. Every filtered search runs this on
/// every photo, so the usual ASCII names are compared in a stack buffer, without allocating.
fn camera_contains(make: &str, model: &str, want: &str) -> bool {
    let want = want.trim();
    let mut buf = [0u8; 128];
    let len = make.len() + 1 + model.len();
    if make.is_ascii() && model.is_ascii() && want.is_ascii() && len <= buf.len() {
        buf[..make.len()].copy_from_slice(make.as_bytes());
        buf[make.len()] = b' ';
        buf[make.len() + 1..len].copy_from_slice(model.as_bytes());
        let hay = &buf[..len];
        let w = want.as_bytes();
        return w.is_empty() || hay.windows(w.len()).any(|win| win.eq_ignore_ascii_case(w));
    }
    format!("{make} {model}")
        .to_lowercase()
        .contains(&want.to_lowercase())
}

/// Great-circle distance (haversine) in kilometres.
pub fn distance_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

/// Which end of a day a date alone stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayEnd {
    /// Its first second (for "taken after": the day is included).
    Start,
    /// The first second of the next day (for "taken before": the day is included).
    NextDay,
}

/// Parses a wall-clock time as people write it: `2024-05-01`, `2024-05-01T12:30`,
/// `2024-05-01T12:30:15` (a space for the `T` also works; no time zone: photos' clocks have
/// none). Returns seconds as in [`PhotoMeta::taken_at`].
pub fn parse_wall_clock(s: &str, day: DayEnd, field: &str) -> Result<i64> {
    let s = s.trim();
    let bad = || {
        Error::InvalidArgument(format!(
            "{field} is {s:?}; write a date as 2024-05-01 or a time as 2024-05-01T12:30:00 \
             (the camera's clock, no time zone)"
        ))
    };
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let d = match day {
            DayEnd::Start => d,
            DayEnd::NextDay => d.succ_opt().ok_or_else(bad)?,
        };
        return Ok(d.and_time(NaiveTime::MIN).and_utc().timestamp());
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc().timestamp());
        }
    }
    Err(bad())
}

/// `2024-05-01T12:30:15` for a wall-clock time in seconds.
pub fn format_wall_clock(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.naive_utc().format("%Y-%m-%dT%H:%M:%S").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// `+02:00` / `-05:30` for an offset in minutes east of UTC.
pub fn format_offset(minutes: i16) -> String {
    let sign = if minutes < 0 { '-' } else { '+' };
    let m = minutes.unsigned_abs();
    format!("{sign}{:02}:{:02}", m / 60, m % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(taken: Option<&str>, camera: (&str, &str), at: Option<(f64, f64)>) -> PhotoMeta {
        PhotoMeta {
            taken_at: taken.map(|t| parse_wall_clock(t, DayEnd::Start, "t").unwrap_or(0)),
            taken_offset_min: None,
            camera_make: Some(camera.0.into()).filter(|s: &String| !s.is_empty()),
            camera_model: Some(camera.1.into()).filter(|s: &String| !s.is_empty()),
            gps_lat: at.map(|a| a.0),
            gps_lon: at.map(|a| a.1),
        }
    }

    #[test]
    fn wall_clock_parsing_and_day_ends() {
        let start = parse_wall_clock("2024-05-01", DayEnd::Start, "x").unwrap_or(0);
        let next = parse_wall_clock("2024-05-01", DayEnd::NextDay, "x").unwrap_or(0);
        assert_eq!(next - start, 86_400);
        assert_eq!(format_wall_clock(start), "2024-05-01T00:00:00");
        let t = parse_wall_clock(" 2024-05-01T12:30:15 ", DayEnd::Start, "x").unwrap_or(0);
        assert_eq!(t - start, 12 * 3600 + 30 * 60 + 15);
        let t2 = parse_wall_clock("2024-05-01 12:30", DayEnd::NextDay, "x").unwrap_or(0);
        assert_eq!(t2 - start, 12 * 3600 + 30 * 60);
        for bad in [
            "2024-13-01",
            "yesterday",
            "2024-05-01T25:00:00",
            "",
            "2024-02-30",
        ] {
            let e = parse_wall_clock(bad, DayEnd::Start, "taken_after");
            assert!(
                matches!(&e, Err(Error::InvalidArgument(m)) if m.contains("taken_after")),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(format_offset(120), "+02:00");
        assert_eq!(format_offset(-330), "-05:30");
        assert_eq!(format_offset(0), "+00:00");
    }

    #[test]
    fn camera_matching_ignores_case_and_spans_make_and_model() {
        assert!(camera_contains("Canon", "EOS 5D", "canon eos"));
        assert!(camera_contains("NIKON CORPORATION", "NIKON D750", "d750"));
        assert!(!camera_contains("Apple", "iPhone 14", "pixel"));
        assert!(camera_contains("Ricoh", "GR Ⅲ", "gr ⅲ"));
        assert!(camera_contains("ÉCLAIR", "Modèle", "éclair mod"));
        let long = "x".repeat(200);
        assert!(camera_contains(&long, "Y", "x y"));
    }

    #[test]
    fn distances() {
        // Oslo - Sydney is about 15,950 km; a point is 0 from itself; antipodes half the
        // circumference.
        let d = distance_km(59.9139, 10.7522, -33.8688, 151.2093);
        assert!((d - 15_950.0).abs() < 60.0, "{d}");
        assert_eq!(distance_km(1.0, 2.0, 1.0, 2.0), 0.0);
        let half = distance_km(0.0, 0.0, 0.0, 180.0);
        assert!((half - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6);
    }

    #[test]
    fn each_condition_and_missing_fields() {
        let oslo = photo(
            Some("2019-06-01T12:00:00"),
            ("Canon", "Canon EOS 5D"),
            Some((59.91, 10.75)),
        );
        let bare = photo(None, ("", ""), None);
        let f = |f: PhotoFilter| {
            (
                f.matches(Some(&oslo)),
                f.matches(Some(&bare)),
                f.matches(None),
            )
        };
        assert_eq!(f(PhotoFilter::default()), (true, true, true));
        let june = |a: &str, b: &str| PhotoFilter {
            taken_after: Some(parse_wall_clock(a, DayEnd::Start, "a").unwrap_or(0)),
            taken_before: Some(parse_wall_clock(b, DayEnd::NextDay, "b").unwrap_or(0)),
            ..Default::default()
        };
        assert_eq!(f(june("2019-06-01", "2019-06-01")), (true, false, false));
        assert_eq!(f(june("2019-06-02", "2019-06-30")), (false, false, false));
        let cam = |c: &str| PhotoFilter {
            camera: Some(c.into()),
            ..Default::default()
        };
        assert_eq!(f(cam("eos 5d")), (true, false, false));
        assert_eq!(f(cam("nikon")), (false, false, false));
        let loc = |b| PhotoFilter {
            has_location: Some(b),
            ..Default::default()
        };
        assert_eq!(f(loc(true)), (true, false, false));
        assert_eq!(f(loc(false)), (false, true, true));
        let near = |r| PhotoFilter {
            near: Some(Near {
                lat: 59.95,
                lon: 10.8,
                radius_km: r,
            }),
            ..Default::default()
        };
        assert_eq!(f(near(10.0)), (true, false, false));
        assert_eq!(f(near(1.0)), (false, false, false));
    }

    #[test]
    fn validation() {
        let t = |s| parse_wall_clock(s, DayEnd::Start, "t").ok();
        let reversed = PhotoFilter {
            taken_after: t("2020-01-02"),
            taken_before: t("2020-01-01"),
            ..Default::default()
        };
        assert!(reversed.validate().is_err());
        for (lat, lon, r) in [(91.0, 0.0, 1.0), (0.0, 181.0, 1.0), (0.0, 0.0, 0.0)] {
            let f = PhotoFilter {
                near: Some(Near {
                    lat,
                    lon,
                    radius_km: r,
                }),
                ..Default::default()
            };
            assert!(f.validate().is_err(), "{lat} {lon} {r}");
        }
        let nan = PhotoFilter {
            near: Some(Near {
                lat: f64::NAN,
                lon: 0.0,
                radius_km: 1.0,
            }),
            ..Default::default()
        };
        assert!(nan.validate().is_err());
    }
}
