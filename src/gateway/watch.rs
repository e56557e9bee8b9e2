//! `POST /v3/watch`: a newline-delimited JSON stream of `{"result": ...}` messages, served
//! from this replica's own applied state.
//!
//! The first line confirms creation (with the current revision); then each line carries the
//! events of whole revisions. With `progress_notify`, an idle stream gets a progress line (no
//! events; the header revision is one up to which everything has been delivered). The last
//! line of a cancelled stream says why (`canceled`, `cancel_reason`, and for compaction the
//! `compact_revision`), so the client knows whether and where to resume.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_store as store;
use http::{Response, StatusCode};

use super::json::{Event, WatchLine, WatchRequest, WatchResponse};
use super::{Api, ApiError, ApiResult};
use crate::http as h;

/// Idle time after which a `progress_notify` stream gets a progress line.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

fn line(msg: WatchResponse) -> Bytes {
    let mut v = serde_json::to_vec(&WatchLine { result: msg }).expect("watch lines serialize");
    v.push(b'\n');
    Bytes::from(v)
}

pub(super) async fn open(api: Arc<Api>, req: WatchRequest) -> ApiResult {
    let c = req.create_request;
    if c.start_revision < 0 {
        return Err(ApiError::BadRequest(
            "start_revision must not be negative".into(),
        ));
    }
    let mut watcher = api.replica.kv().watch(store::WatchRequest {
        key: c.key,
        range_end: c.range_end,
        start_revision: c.start_revision,
        prev_kv: c.prev_kv,
    })?;
    let (tx, body) = h::channel_body(64);
    let created = WatchResponse {
        header: api.header(api.replica.kv().revision()),
        created: true,
        ..WatchResponse::default()
    };
    let progress = c.progress_notify;
    api.metrics.watch_opened();
    tokio::spawn(async move {
        let _closed = api.metrics.watch_guard();
        if tx.send(line(created)).await.is_err() {
            return;
        }
        let mut idle = tokio::time::interval(PROGRESS_INTERVAL);
        idle.tick().await;
        loop {
            let msg = tokio::select! {
                _ = api.shutdown.cancelled() => WatchResponse {
                    header: api.header(api.replica.kv().revision()),
                    canceled: true,
                    cancel_reason: "server is shutting down".into(),
                    ..WatchResponse::default()
                },
                _ = tx.closed() => return,
                _ = idle.tick(), if progress => {
                    watcher.request_progress();
                    continue;
                }
                m = watcher.recv() => match m {
                    Ok(store::WatchMessage::Events(events)) => {
                        idle.reset();
                        let rev = events.last().map_or(0, |e| e.kv.mod_revision);
                        api.metrics.watch_events(events.len());
                        WatchResponse {
                            header: api.header(rev),
                            events: events.into_iter().map(Event::from).collect(),
                            ..WatchResponse::default()
                        }
                    }
                    Ok(store::WatchMessage::Progress(rev)) => WatchResponse {
                        header: api.header(rev),
                        ..WatchResponse::default()
                    },
                    Err(reason) => {
                        let compact_revision = match &reason {
                            store::CancelReason::Compacted { compact_revision, .. } => *compact_revision,
                            _ => 0,
                        };
                        if matches!(reason, store::CancelReason::Slow { .. }) {
                            api.metrics.slow_watcher();
                        }
                        WatchResponse {
                            header: api.header(api.replica.kv().revision()),
                            canceled: true,
                            compact_revision,
                            cancel_reason: reason.to_string(),
                            ..WatchResponse::default()
                        }
                    }
                },
            };
            let last = msg.canceled;
            if tx.send(line(msg)).await.is_err() || last {
                return;
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("static response parts are valid"))
}
