//! Push step 4: the rows of one scoped table, read through an SPI cursor from the push's
//! snapshot and turned into COPY data (text or binary) in chunks.

use super::{cancelled, progress};
use crate::net::JobError;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use poco_core::learner::copy_escape_into;
use std::ffi::{CStr, CString};

/// Run the scoped query as a cursor and hand COPY data (text, or binary with the types' send
/// functions) to `emit` in chunks of about `chunk` bytes. Returns the number of rows.
pub(super) fn stream_rows(
    sql: &str,
    parent: &str,
    chunk: usize,
    binary: bool,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<(), JobError>,
) -> Result<i64, JobError> {
    const FETCH: i64 = 1000;
    let csql = CString::new(sql).map_err(|_| JobError::new("XX000", "query contains NUL"))?;
    let mut rows: i64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk + 64 * 1024);
    if binary {
        // Signature, flags (no OIDs), header extension length.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0u32.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
    }
    let mut row_ctx = PgMemoryContexts::new("poco_sync copy rows");
    let mut pending_err: Option<JobError> = None;
    unsafe {
        if pg_sys::SPI_connect() < 0 {
            return Err(JobError::new("XX000", "SPI_connect failed"));
        }
        let mut argtypes = [pg_sys::TEXTOID];
        let ptext = CString::new(parent).unwrap_or_default();
        let mut values = [pg_sys::Datum::from(pg_sys::cstring_to_text(ptext.as_ptr()))];
        let nulls = [b' ' as std::os::raw::c_char];
        let portal = pg_sys::SPI_cursor_open_with_args(
            std::ptr::null(),
            csql.as_ptr(),
            1,
            argtypes.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            true,
            0,
        );
        let mut out_funcs: Vec<pg_sys::FmgrInfo> = Vec::new();
        let mut values_buf: Vec<pg_sys::Datum> = Vec::new();
        let mut nulls_buf: Vec<bool> = Vec::new();
        'fetch: loop {
            pg_sys::SPI_cursor_fetch(portal, true, FETCH);
            let n = pg_sys::SPI_processed as usize;
            let tt = pg_sys::SPI_tuptable;
            if n == 0 || tt.is_null() {
                break;
            }
            let tupdesc = (*tt).tupdesc;
            let natts = (*tupdesc).natts as usize;
            if out_funcs.is_empty() && natts > 0 {
                for i in 0..natts {
                    let att = (*tupdesc).attrs.as_ptr().add(i);
                    let mut func = pg_sys::InvalidOid;
                    let mut varlena = false;
                    if binary {
                        pg_sys::getTypeBinaryOutputInfo((*att).atttypid, &mut func, &mut varlena);
                    } else {
                        pg_sys::getTypeOutputInfo((*att).atttypid, &mut func, &mut varlena);
                    }
                    let mut finfo: pg_sys::FmgrInfo = std::mem::zeroed();
                    pg_sys::fmgr_info(func, &mut finfo);
                    out_funcs.push(finfo);
                }
                values_buf = vec![pg_sys::Datum::from(0usize); natts];
                nulls_buf = vec![false; natts];
            }
            let tuples = std::slice::from_raw_parts((*tt).vals, n);
            row_ctx.switch_to(|_| {
                for &tup in tuples {
                    pg_sys::heap_deform_tuple(
                        tup,
                        tupdesc,
                        values_buf.as_mut_ptr(),
                        nulls_buf.as_mut_ptr(),
                    );
                    if binary {
                        buf.extend_from_slice(&(natts as i16).to_be_bytes());
                        for i in 0..natts {
                            if nulls_buf[i] {
                                buf.extend_from_slice(&(-1i32).to_be_bytes());
                            } else {
                                let b = pg_sys::SendFunctionCall(&mut out_funcs[i], values_buf[i]);
                                let len = pgrx::varlena::varsize_any_exhdr(b);
                                let data = pgrx::varlena::vardata_any(b) as *const u8;
                                buf.extend_from_slice(&(len as i32).to_be_bytes());
                                buf.extend_from_slice(std::slice::from_raw_parts(data, len));
                            }
                        }
                        continue;
                    }
                    for i in 0..natts {
                        if i > 0 {
                            buf.push(b'\t');
                        }
                        if nulls_buf[i] {
                            buf.extend_from_slice(b"\\N");
                        } else {
                            let cs = pg_sys::OutputFunctionCall(&mut out_funcs[i], values_buf[i]);
                            copy_escape_into(&mut buf, CStr::from_ptr(cs).to_bytes());
                        }
                    }
                    buf.push(b'\n');
                }
            });
            row_ctx.reset();
            pg_sys::SPI_freetuptable(tt);
            rows += n as i64;
            progress(|s| s.rows_done += n as i64);
            if buf.len() >= chunk {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(chunk + 64 * 1024));
                if let Err(e) = emit(full) {
                    pending_err = Some(e);
                    break 'fetch;
                }
            }
            if cancelled() {
                pending_err = Some(JobError::cancelled());
                break;
            }
        }
        pg_sys::SPI_cursor_close(portal);
        pg_sys::SPI_finish();
    }
    if let Some(e) = pending_err {
        return Err(e);
    }
    if binary {
        buf.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    }
    if !buf.is_empty() {
        emit(buf)?;
    }
    Ok(rows)
}
