//! Listing handlers: `GET …/commands` on the three URL families.

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::response::Response;

use super::AppState;
use super::auth::Caller;
use super::commands::{DevicePath, Route, json_response, parse_device, path_value};
use super::error::ApiError;
use super::query::{next_link, parse_list_options};
use super::views::CommandPage;
use crate::store::{Cursor, ListQuery, ListScope};

/// `GET /commands`: every command.
pub async fn list_all(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
) -> Result<Response, ApiError> {
    list(&state, &caller, None, Route::Any, &uri).await
}

/// `GET /devices/{deviceId}/commands` and `GET /me/devices/{deviceId}/commands`.
pub async fn list_device(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<DevicePath>, PathRejection>,
    uri: Uri,
    route: Route,
) -> Result<Response, ApiError> {
    let device = parse_device(&path_value(path)?.device_id)?;
    list(&state, &caller, Some(device), route, &uri).await
}

async fn list(
    state: &AppState,
    caller: &Caller,
    device: Option<crate::domain::DeviceId>,
    route: Route,
    uri: &Uri,
) -> Result<Response, ApiError> {
    let options = parse_list_options(uri.query())?;
    let scope = match (route, device) {
        (Route::Device, Some(device)) => ListScope::Device(device),
        (Route::Me, Some(device)) => ListScope::OwnDevice {
            device,
            owner: caller.subject.clone(),
        },
        _ => ListScope::All,
    };
    let query = ListQuery {
        scope,
        statuses: options.filter.statuses.clone(),
        created_after: options.filter.created_after,
        created_before: options.filter.created_before,
        after: options.after.clone(),
        // Fetching one row more than the page shows whether another follows.
        limit: options.top + 1,
    };
    let mut commands = state.store.list_commands(&query).await?;
    let page_size = usize::try_from(options.top).unwrap_or(usize::MAX);
    let more = commands.len() > page_size;
    commands.truncate(page_size);
    let next_link = match commands.last() {
        Some(last) if more => Some(next_link(
            uri.path(),
            &options,
            &Cursor {
                created_at: last.created_at,
                id: last.id,
            },
        )),
        _ => None,
    };
    let page = CommandPage {
        value: commands
            .iter()
            .map(|command| command.representation(None))
            .collect(),
        next_link,
    };
    Ok(json_response(
        serde_json::to_string(&page).expect("a command page always serializes"),
    ))
}
