//! Parquet files: image shards (full rows with embeddings) and patch files (later changes to the
//! mutable fields of existing images). Both are plain Parquet with the Arrow schema embedded, so
//! pyarrow, DuckDB and polars read them directly.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Float16Array, Float32Array,
    Float64Array, Int16Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMillisecondArray, TimestampNanosecondArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{
    DataType, Field, Float16Type, Float32Type, Float64Type, Int16Type, Schema, SchemaRef, TimeUnit,
    TimestampMillisecondType, TimestampNanosecondType, UInt32Type, UInt64Type,
};
use blipdex_core::{Error, Result};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::fsutil;

/// A shard reader and the file's key-value metadata.
type ReaderWithMeta = (ParquetRecordBatchReaderBuilder<File>, Vec<(String, String)>);
use crate::types::{Dtype, ImageRow, PhotoMeta};

/// Key-value metadata in every file, so a Parquet file alone says what it holds.
pub(crate) const KV_FINGERPRINT: &str = "blipdex.model_fingerprint";
pub(crate) const KV_NUM_QUERY: &str = "blipdex.num_query";
pub(crate) const KV_DIM: &str = "blipdex.dim";
pub(crate) const KV_KIND: &str = "blipdex.kind";

const UTC: &str = "UTC";

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some(UTC.into()))
}

fn paths_field() -> Field {
    Field::new(
        "paths",
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))),
        false,
    )
}

fn embeds_type(dtype: Dtype, len: usize) -> DataType {
    let elem = match dtype {
        Dtype::F32 => DataType::Float32,
        Dtype::F16 => DataType::Float16,
    };
    DataType::FixedSizeList(Arc::new(Field::new("item", elem, false)), len as i32)
}

/// The EXIF columns, last in shards and patches (files written before them lack them: their
/// images read as "never read"). `taken_at` is the camera's wall-clock time, so it has no time
/// zone; `taken_at_offset_minutes` is the offset the camera recorded, where it did.
fn meta_fields() -> [Field; 7] {
    [
        Field::new("exif_read", DataType::Boolean, true),
        Field::new(
            "taken_at",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        ),
        Field::new("taken_at_offset_minutes", DataType::Int16, true),
        Field::new("camera_make", DataType::Utf8, true),
        Field::new("camera_model", DataType::Utf8, true),
        Field::new("gps_latitude", DataType::Float64, true),
        Field::new("gps_longitude", DataType::Float64, true),
    ]
}

fn meta_columns(metas: &[Option<&PhotoMeta>]) -> [ArrayRef; 7] {
    let f = |g: fn(&PhotoMeta) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(metas.iter().map(|m| m.and_then(g))))
    };
    let s = |g: fn(&PhotoMeta) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(metas.iter().map(|m| m.and_then(g))))
    };
    [
        Arc::new(BooleanArray::from_iter(
            metas.iter().map(|m| Some(m.is_some())),
        )),
        // Parquet has no second unit; milliseconds keep the column a TIMESTAMP for readers.
        Arc::new(TimestampMillisecondArray::from_iter(metas.iter().map(
            |m| m.and_then(|m| m.taken_at).and_then(|t| t.checked_mul(1000)),
        ))),
        Arc::new(Int16Array::from_iter(
            metas.iter().map(|m| m.and_then(|m| m.taken_offset_min)),
        )),
        s(|m| m.camera_make.as_deref()),
        s(|m| m.camera_model.as_deref()),
        f(|m| m.location().map(|l| l.0)),
        f(|m| m.location().map(|l| l.1)),
    ]
}

pub(crate) fn shard_schema(dtype: Dtype, num_query: usize, dim: usize) -> SchemaRef {
    let mut fields = vec![
        Field::new("image_id", DataType::UInt64, false),
        Field::new("path", DataType::Utf8, false),
        paths_field(),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("file_size", DataType::UInt64, false),
        Field::new("mtime", ts_type(), false),
        Field::new("image_embeds", embeds_type(dtype, num_query * dim), false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("deleted", DataType::Boolean, false),
        Field::new("ingested_at", ts_type(), false),
        Field::new("model_fingerprint", DataType::Utf8, false),
    ];
    fields.extend(meta_fields());
    Arc::new(Schema::new(fields))
}

pub(crate) fn patch_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("image_id", DataType::UInt64, false),
        Field::new("path", DataType::Utf8, false),
        paths_field(),
        Field::new("caption", DataType::Utf8, true),
        Field::new("deleted", DataType::Boolean, false),
        Field::new("updated_at", ts_type(), false),
    ];
    fields.extend(meta_fields());
    Arc::new(Schema::new(fields))
}

/// What a shard or patch file must agree with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout<'a> {
    pub fingerprint: &'a str,
    pub num_query: usize,
    pub dim: usize,
    pub dtype: Dtype,
}

fn props(layout: &Layout<'_>, kind: &str, rows_per_group: usize) -> WriterProperties {
    let embeds = ColumnPath::new(vec!["image_embeds".into(), "list".into(), "item".into()]);
    let kv = vec![
        KeyValue::new(KV_FINGERPRINT.into(), layout.fingerprint.to_string()),
        KeyValue::new(KV_NUM_QUERY.into(), layout.num_query.to_string()),
        KeyValue::new(KV_DIM.into(), layout.dim.to_string()),
        KeyValue::new(KV_KIND.into(), kind.to_string()),
    ];
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(rows_per_group.max(1)))
        .set_key_value_metadata(Some(kv))
        // Embeddings are stored PLAIN and uncompressed, so each row's vectors are contiguous bytes
        // in the file that readers map and score in place (see `embeds_offsets`): zstd saved
        // only 7% on f16 (13% on byte-stream-split f32) and would force a second, decoded copy.
        .set_column_compression(embeds.clone(), Compression::UNCOMPRESSED)
        .set_column_encoding(embeds.clone(), Encoding::PLAIN)
        // Floats do not dictionary-encode and min/max over embedding values is useless.
        .set_column_dictionary_enabled(embeds.clone(), false)
        .set_column_statistics_enabled(embeds, EnabledStatistics::None)
        .build()
}

/// Where each row's embedding values start in the shard file `path`, if the file stores them
/// PLAIN and uncompressed (shards written before that did not): found through the offset
/// index, in which every data page begins on a row boundary. In a data page of a column with
/// no nulls the values are the last bytes of the page, after its header and level runs, so
/// row `j` of a page holding `n` rows starts `(n - j) * row_bytes` before the page's end.
/// `None` if the layout is not that; the caller still compares the bytes found there with the
/// values it expects before trusting the offsets.
pub(crate) fn embeds_offsets(
    path: &Path,
    layout: &Layout<'_>,
    rows: usize,
) -> Result<Option<Vec<u64>>> {
    use parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
    let r = Reader { path };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Optional)
        .parse_and_finish(&file)
        .map_err(|e| r.err(e))?;
    let row_bytes = (layout.num_query * layout.dim * layout.dtype.bytes()) as u64;
    let schema = meta.file_metadata().schema_descr();
    let Some(col) = (0..schema.num_columns()).find(|&i| {
        schema.column(i).path().parts().first().map(String::as_str) == Some("image_embeds")
    }) else {
        return Ok(None);
    };
    let Some(index) = meta.offset_index() else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(rows);
    for (g, rg) in meta.row_groups().iter().enumerate() {
        let c = rg.column(col);
        if c.compression() != Compression::UNCOMPRESSED {
            return Ok(None);
        }
        let Some(pages) = index.get(g).and_then(|cols| cols.get(col)) else {
            return Ok(None);
        };
        let pages = pages.page_locations();
        let group_rows = rg.num_rows();
        for (p, loc) in pages.iter().enumerate() {
            let first = loc.first_row_index;
            let next = pages.get(p + 1).map_or(group_rows, |n| n.first_row_index);
            let (Ok(n), Ok(end)) = (
                u64::try_from(next - first),
                u64::try_from(loc.offset + i64::from(loc.compressed_page_size)),
            ) else {
                return Ok(None);
            };
            if n * row_bytes > end {
                return Ok(None);
            }
            out.extend((0..n).map(|j| end - (n - j) * row_bytes));
        }
    }
    Ok((out.len() == rows).then_some(out))
}

fn write_batch(dir: &Path, name: &str, batch: &RecordBatch, props: WriterProperties) -> Result<()> {
    let target = dir.join(name);
    fsutil::write_durable(dir, name, |f| {
        let file = f.try_clone().map_err(|e| fsutil::write_err(&target, e))?;
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))
            .map_err(|e| fsutil::write_err(&target, e))?;
        w.write(batch).map_err(|e| fsutil::write_err(&target, e))?;
        w.close().map_err(|e| fsutil::write_err(&target, e))?;
        Ok(())
    })
}

fn paths_array<'a>(rows: impl Iterator<Item = &'a [String]>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Utf8,
        false,
    )));
    for paths in rows {
        for p in paths {
            b.values().append_value(p);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn ts_array(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from(v).with_timezone(UTC))
}

/// Writes `rows` (with `embeds`, rows.len() * Q * E values) durably as `dir/name`.
pub(crate) fn write_shard(
    dir: &Path,
    name: &str,
    layout: &Layout<'_>,
    rows: &[ImageRow],
    embeds: &[f32],
) -> Result<()> {
    let qe = layout.num_query * layout.dim;
    debug_assert_eq!(embeds.len(), rows.len() * qe);
    let schema = shard_schema(layout.dtype, layout.num_query, layout.dim);
    let elem_field = match schema.field(8).data_type() {
        DataType::FixedSizeList(f, _) => f.clone(),
        _ => unreachable!("image_embeds is a fixed-size list"),
    };
    let values: ArrayRef = match layout.dtype {
        Dtype::F32 => Arc::new(Float32Array::from(embeds.to_vec())),
        Dtype::F16 => Arc::new(Float16Array::from(
            embeds
                .iter()
                .map(|&x| half::f16::from_f32(x))
                .collect::<Vec<_>>(),
        )),
    };
    let embeds_arr = FixedSizeListArray::try_new(elem_field, qe as i32, values, None)
        .map_err(|e| fsutil::write_err(&dir.join(name), e))?;
    let n = rows.len();
    let metas: Vec<Option<&PhotoMeta>> = rows.iter().map(|r| r.meta.as_ref()).collect();
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.image_id),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.path))),
        paths_array(rows.iter().map(|r| r.paths.as_slice())),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| &r.content_hash),
        )),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.width))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.height))),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.file_size),
        )),
        ts_array(rows.iter().map(|r| r.mtime_ns).collect()),
        Arc::new(embeds_arr),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.caption.as_deref()),
        )),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.deleted)),
        )),
        ts_array(rows.iter().map(|r| r.ingested_at_ns).collect()),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            layout.fingerprint,
            n,
        ))),
    ];
    cols.extend(meta_columns(&metas));
    let batch =
        RecordBatch::try_new(schema, cols).map_err(|e| fsutil::write_err(&dir.join(name), e))?;
    // About 32 MiB of embeddings per row group: big enough for zstd, small enough to stream.
    let row_bytes = qe * if layout.dtype == Dtype::F32 { 4 } else { 2 };
    let rows_per_group = (32 << 20) / row_bytes.max(1);
    write_batch(dir, name, &batch, props(layout, "shard", rows_per_group))
}

/// One row of a patch file: the new values of an image's mutable fields.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Patch {
    pub image_id: u64,
    pub path: String,
    pub paths: Vec<String>,
    pub caption: Option<String>,
    pub meta: Option<PhotoMeta>,
    pub deleted: bool,
    pub updated_at_ns: i64,
}

pub(crate) fn write_patch(
    dir: &Path,
    name: &str,
    layout: &Layout<'_>,
    rows: &[Patch],
) -> Result<()> {
    let metas: Vec<Option<&PhotoMeta>> = rows.iter().map(|r| r.meta.as_ref()).collect();
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.image_id),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.path))),
        paths_array(rows.iter().map(|r| r.paths.as_slice())),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.caption.as_deref()),
        )),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.deleted)),
        )),
        ts_array(rows.iter().map(|r| r.updated_at_ns).collect()),
    ];
    cols.extend(meta_columns(&metas));
    let batch = RecordBatch::try_new(patch_schema(), cols)
        .map_err(|e| fsutil::write_err(&dir.join(name), e))?;
    write_batch(dir, name, &batch, props(layout, "patch", 1 << 20))
}

// ---- reading ----

struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, reason: impl std::fmt::Display) -> Error {
        let dir = self.path.parent().unwrap_or(self.path);
        Error::store(dir, format!("{}: {reason}", self.path.display()))
    }

    fn col<'b>(&self, batch: &'b RecordBatch, name: &str) -> Result<&'b ArrayRef> {
        let c = batch
            .column_by_name(name)
            .ok_or_else(|| self.err(format!("no column {name}")))?;
        Ok(c)
    }

    fn no_nulls(&self, a: &dyn Array, name: &str) -> Result<()> {
        if a.null_count() > 0 {
            return Err(self.err(format!("column {name} has nulls")));
        }
        Ok(())
    }

    fn u64s(&self, b: &RecordBatch, name: &str) -> Result<Vec<u64>> {
        let a = self.col(b, name)?;
        self.no_nulls(a.as_ref(), name)?;
        let p = a
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| self.err(format!("column {name} is not uint64")))?;
        Ok(p.values().to_vec())
    }

    fn u32s(&self, b: &RecordBatch, name: &str) -> Result<Vec<u32>> {
        let a = self.col(b, name)?;
        self.no_nulls(a.as_ref(), name)?;
        let p = a
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| self.err(format!("column {name} is not uint32")))?;
        Ok(p.values().to_vec())
    }

    fn timestamps(&self, b: &RecordBatch, name: &str) -> Result<Vec<i64>> {
        let a = self.col(b, name)?;
        self.no_nulls(a.as_ref(), name)?;
        let p = a
            .as_primitive_opt::<TimestampNanosecondType>()
            .ok_or_else(|| self.err(format!("column {name} is not timestamp[ns]")))?;
        Ok(p.values().to_vec())
    }

    fn bools(&self, b: &RecordBatch, name: &str) -> Result<Vec<bool>> {
        let a = self.col(b, name)?;
        self.no_nulls(a.as_ref(), name)?;
        let p = a
            .as_boolean_opt()
            .ok_or_else(|| self.err(format!("column {name} is not bool")))?;
        Ok(p.iter().map(|v| v.unwrap_or(false)).collect())
    }

    fn strings(&self, b: &RecordBatch, name: &str, nullable: bool) -> Result<Vec<Option<String>>> {
        let a = self.col(b, name)?;
        if !nullable {
            self.no_nulls(a.as_ref(), name)?;
        }
        let s = a
            .as_string_opt::<i32>()
            .ok_or_else(|| self.err(format!("column {name} is not utf8")))?;
        Ok(s.iter().map(|v| v.map(str::to_owned)).collect())
    }

    fn required_strings(&self, b: &RecordBatch, name: &str) -> Result<Vec<String>> {
        Ok(self
            .strings(b, name, false)?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect())
    }

    fn string_lists(&self, b: &RecordBatch, name: &str) -> Result<Vec<Vec<String>>> {
        let a = self.col(b, name)?;
        self.no_nulls(a.as_ref(), name)?;
        let l = a
            .as_list_opt::<i32>()
            .ok_or_else(|| self.err(format!("column {name} is not list<utf8>")))?;
        let vals = l
            .values()
            .as_string_opt::<i32>()
            .ok_or_else(|| self.err(format!("column {name} is not list<utf8>")))?;
        let offs = l.value_offsets();
        Ok((0..l.len())
            .map(|i| {
                (offs[i] as usize..offs[i + 1] as usize)
                    .map(|j| vals.value(j).to_owned())
                    .collect()
            })
            .collect())
    }

    /// The EXIF columns of a batch, one entry per row; all `None` in files written before them.
    fn metas(&self, b: &RecordBatch) -> Result<Vec<Option<PhotoMeta>>> {
        let n = b.num_rows();
        let Some(read) = b.column_by_name("exif_read") else {
            return Ok(vec![None; n]);
        };
        let read = read
            .as_boolean_opt()
            .ok_or_else(|| self.err("column exif_read is not bool"))?;
        let prim = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| self.err(format!("no column {name}")))
        };
        let taken = prim("taken_at")?
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| self.err("column taken_at is not timestamp[ms]"))?;
        let offset = prim("taken_at_offset_minutes")?
            .as_primitive_opt::<Int16Type>()
            .ok_or_else(|| self.err("column taken_at_offset_minutes is not int16"))?;
        let make = self.strings(b, "camera_make", true)?;
        let model = self.strings(b, "camera_model", true)?;
        let lat = prim("gps_latitude")?
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| self.err("column gps_latitude is not double"))?;
        let lon = prim("gps_longitude")?
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| self.err("column gps_longitude is not double"))?;
        let opt = |a: &dyn Array, i: usize| a.is_valid(i);
        Ok((0..n)
            .map(|i| {
                (read.is_valid(i) && read.value(i)).then(|| PhotoMeta {
                    taken_at: opt(taken, i).then(|| taken.value(i).div_euclid(1000)),
                    taken_offset_min: opt(offset, i).then(|| offset.value(i)),
                    camera_make: make[i].clone(),
                    camera_model: model[i].clone(),
                    gps_lat: opt(lat, i).then(|| lat.value(i)),
                    gps_lon: opt(lon, i).then(|| lon.value(i)),
                })
            })
            .collect())
    }

    fn open(&self) -> Result<ReaderWithMeta> {
        let f = File::open(self.path).map_err(|e| Error::io(self.path, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| self.err(e))?;
        let kv = b
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| {
                kv.iter()
                    .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        Ok((b.with_batch_size(1024), kv))
    }

    fn check_kv(&self, kv: &[(String, String)], layout: &Layout<'_>) -> Result<()> {
        let get = |k: &str| kv.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        if let Some(fp) = get(KV_FINGERPRINT) {
            if fp != layout.fingerprint {
                return Err(self.err(format!(
                    "written for model {fp}, the manifest says {}",
                    layout.fingerprint
                )));
            }
        }
        Ok(())
    }
}

/// Reads a shard, writing its embeddings (as f32) into `embeds`, which must hold exactly
/// rows * Q * E values.
pub(crate) fn read_shard(
    path: &Path,
    layout: &Layout<'_>,
    embeds: &mut [f32],
) -> Result<Vec<ImageRow>> {
    let r = Reader { path };
    let (builder, kv) = r.open()?;
    r.check_kv(&kv, layout)?;
    let qe = layout.num_query * layout.dim;
    let reader = builder.build().map_err(|e| r.err(e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| r.err(e))?;
        let ids = r.u64s(&b, "image_id")?;
        let path_col = r.required_strings(&b, "path")?;
        let paths = r.string_lists(&b, "paths")?;
        let hashes = r.required_strings(&b, "content_hash")?;
        let widths = r.u32s(&b, "width")?;
        let heights = r.u32s(&b, "height")?;
        let sizes = r.u64s(&b, "file_size")?;
        let mtimes = r.timestamps(&b, "mtime")?;
        let captions = r.strings(&b, "caption", true)?;
        let deleted = r.bools(&b, "deleted")?;
        let ingested = r.timestamps(&b, "ingested_at")?;
        let metas = r.metas(&b)?;

        let e = r.col(&b, "image_embeds")?;
        r.no_nulls(e.as_ref(), "image_embeds")?;
        let fsl = e
            .as_fixed_size_list_opt()
            .ok_or_else(|| r.err("image_embeds is not a fixed-size list"))?;
        if fsl.value_length() as usize != qe {
            return Err(r.err(format!(
                "image_embeds has {} values per row, the manifest says {}x{}",
                fsl.value_length(),
                layout.num_query,
                layout.dim
            )));
        }
        let n = b.num_rows();
        let vals = fsl.values();
        if vals.len() != n * qe || vals.null_count() > 0 {
            return Err(r.err("image_embeds values do not match the row count"));
        }
        let start = rows.len() * qe;
        let out = embeds
            .get_mut(start..start + n * qe)
            .ok_or_else(|| r.err("more rows than the manifest says"))?;
        if let Some(v) = vals.as_primitive_opt::<Float32Type>() {
            out.copy_from_slice(v.values());
        } else if let Some(v) = vals.as_primitive_opt::<Float16Type>() {
            for (o, x) in out.iter_mut().zip(v.values().iter()) {
                *o = x.to_f32();
            }
        } else {
            return Err(r.err("image_embeds elements are neither float32 nor float16"));
        }

        let mut it = path_col
            .into_iter()
            .zip(paths)
            .zip(hashes)
            .zip(captions)
            .zip(metas);
        for i in 0..n {
            let Some(((((path, paths), content_hash), caption), meta)) = it.next() else {
                break;
            };
            rows.push(ImageRow {
                image_id: ids[i],
                path,
                paths,
                content_hash,
                width: widths[i],
                height: heights[i],
                file_size: sizes[i],
                mtime_ns: mtimes[i],
                caption,
                meta,
                deleted: deleted[i],
                ingested_at_ns: ingested[i],
            });
        }
    }
    Ok(rows)
}

pub(crate) fn read_patch(path: &Path, layout: &Layout<'_>) -> Result<Vec<Patch>> {
    let r = Reader { path };
    let (builder, kv) = r.open()?;
    r.check_kv(&kv, layout)?;
    let reader = builder.build().map_err(|e| r.err(e))?;
    let mut out = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| r.err(e))?;
        let ids = r.u64s(&b, "image_id")?;
        let path_col = r.required_strings(&b, "path")?;
        let paths = r.string_lists(&b, "paths")?;
        let captions = r.strings(&b, "caption", true)?;
        let deleted = r.bools(&b, "deleted")?;
        let updated = r.timestamps(&b, "updated_at")?;
        let metas = r.metas(&b)?;
        let it = path_col.into_iter().zip(paths).zip(captions).zip(metas);
        for (i, (((path, paths), caption), meta)) in it.enumerate() {
            out.push(Patch {
                image_id: ids[i],
                path,
                paths,
                caption,
                meta,
                deleted: deleted[i],
                updated_at_ns: updated[i],
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards and patches written before the EXIF columns existed read as "never read".
    #[test]
    fn files_without_exif_columns_read_as_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            fingerprint: "fp",
            num_query: 1,
            dim: 2,
            dtype: Dtype::F32,
        };
        let row = ImageRow {
            image_id: 0,
            path: "/a.jpg".into(),
            paths: vec!["/a.jpg".into()],
            content_hash: "00".repeat(32),
            width: 1,
            height: 1,
            file_size: 1,
            mtime_ns: 0,
            caption: None,
            meta: Some(PhotoMeta {
                camera_make: Some("Canon".into()),
                ..Default::default()
            }),
            deleted: false,
            ingested_at_ns: 0,
        };
        write_shard(
            dir.path(),
            "new.parquet",
            &layout,
            std::slice::from_ref(&row),
            &[1.0, 0.0],
        )
        .unwrap();
        let mut embeds = vec![0.0; 2];
        let back = read_shard(&dir.path().join("new.parquet"), &layout, &mut embeds).unwrap();
        assert_eq!(back[0].meta, row.meta);

        // The same file as an older blipdex wrote it: without the last seven columns.
        let file = File::open(dir.path().join("new.parquet")).unwrap();
        let batch = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let old = batch
            .project(&(0..batch.num_columns() - 7).collect::<Vec<_>>())
            .unwrap();
        assert!(old.column_by_name("exif_read").is_none());
        write_batch(dir.path(), "old.parquet", &old, props(&layout, "shard", 16)).unwrap();
        let back = read_shard(&dir.path().join("old.parquet"), &layout, &mut embeds).unwrap();
        assert_eq!(back[0].meta, None);
        assert_eq!(back[0].path, row.path);
    }
}
