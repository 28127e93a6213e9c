//! The one list of the API's operations. The router and the OpenAPI
//! document are both built from [`Operation::all`], so neither can list a
//! route that the other lacks.

use axum::Router;
use axum::http::Method;
use axum::routing::{MethodRouter, get, post};

use super::commands::{self, Route};
use super::{AppState, listing, openapi};

/// One HTTP operation of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Health,
    Ready,
    OpenApi,
    ListCommands(Route),
    CreateCommand(Route),
    GetCommand(Route),
    GetResponsePayload(Route),
    GetHistory(Route),
    ListPostbacks(Route),
    ResendPostback(Route),
    CancelCommand(Route),
}

const ROUTES: [Route; 3] = [Route::Any, Route::Device, Route::Me];

impl Operation {
    /// Lists every operation, in the order of the OpenAPI document.
    pub fn all() -> Vec<Self> {
        let mut all = vec![Self::Health, Self::Ready, Self::OpenApi];
        let per_route: [fn(Route) -> Self; 8] = [
            Self::ListCommands,
            Self::CreateCommand,
            Self::GetCommand,
            Self::GetResponsePayload,
            Self::GetHistory,
            Self::ListPostbacks,
            Self::ResendPostback,
            Self::CancelCommand,
        ];
        for make in per_route {
            all.extend(ROUTES.map(make));
        }
        all
    }

    pub fn method(self) -> Method {
        match self {
            Self::CreateCommand(_) | Self::ResendPostback(_) | Self::CancelCommand(_) => {
                Method::POST
            }
            _ => Method::GET,
        }
    }

    /// Returns the path in axum's syntax, with `{device_id}` and `{id}` parameters.
    pub fn path(self) -> String {
        let collection = |route: Route| match route {
            Route::Any => "/commands",
            Route::Device => "/devices/{device_id}/commands",
            Route::Me => "/me/devices/{device_id}/commands",
        };
        let item = |route: Route, tail: &str| format!("{}/{{id}}{tail}", collection(route));
        match self {
            Self::Health => "/health".to_owned(),
            Self::Ready => "/health/ready".to_owned(),
            Self::OpenApi => "/openapi.json".to_owned(),
            Self::ListCommands(route) | Self::CreateCommand(route) => collection(route).to_owned(),
            Self::GetCommand(route) => item(route, ""),
            Self::GetResponsePayload(route) => item(route, "/responsePayload"),
            Self::GetHistory(route) => item(route, "/history"),
            Self::ListPostbacks(route) => item(route, "/postbacks"),
            Self::ResendPostback(route) => item(route, "/postbacks/resend"),
            Self::CancelCommand(route) => item(route, "/cancel"),
        }
    }

    /// Returns whether the operation needs a bearer token. Health and the
    /// API description are public, like the documentation they serve.
    pub fn requires_token(self) -> bool {
        !matches!(self, Self::Health | Self::Ready | Self::OpenApi)
    }

    /// Returns the route family of a command operation.
    pub fn route(self) -> Option<Route> {
        match self {
            Self::Health | Self::Ready | Self::OpenApi => None,
            Self::ListCommands(route)
            | Self::CreateCommand(route)
            | Self::GetCommand(route)
            | Self::GetResponsePayload(route)
            | Self::GetHistory(route)
            | Self::ListPostbacks(route)
            | Self::ResendPostback(route)
            | Self::CancelCommand(route) => Some(route),
        }
    }

    fn handler(self) -> MethodRouter<AppState> {
        match self {
            Self::Health => get(super::health),
            Self::Ready => get(super::ready),
            Self::OpenApi => get(openapi::serve),
            Self::ListCommands(Route::Any) => get(listing::list_all),
            Self::ListCommands(route) => get(move |state, caller, path, uri| {
                listing::list_device(state, caller, path, uri, route)
            }),
            Self::CreateCommand(Route::Any) => post(commands::create_any),
            Self::CreateCommand(Route::Device) => post(commands::create_for_device),
            Self::CreateCommand(Route::Me) => post(commands::create_for_my_device),
            Self::GetCommand(route) => {
                get(move |state, caller, path| commands::get_command(state, caller, path, route))
            }
            Self::GetResponsePayload(route) => get(move |state, caller, path| {
                commands::get_response_payload(state, caller, path, route)
            }),
            Self::GetHistory(route) => {
                get(move |state, caller, path| commands::get_history(state, caller, path, route))
            }
            Self::ListPostbacks(route) => {
                get(move |state, caller, path| commands::get_postbacks(state, caller, path, route))
            }
            Self::ResendPostback(route) => post(move |state, caller, path| {
                commands::resend_postback(state, caller, path, route)
            }),
            Self::CancelCommand(route) => post(move |state, caller, path| {
                commands::cancel_command(state, caller, path, route)
            }),
        }
    }
}

/// Builds a router with the operations whose `requires_token` equals
/// `authenticated`.
pub fn operations_router(authenticated: bool) -> Router<AppState> {
    Operation::all()
        .into_iter()
        .filter(|operation| operation.requires_token() == authenticated)
        .fold(Router::new(), |router, operation| {
            router.route(&operation.path(), operation.handler())
        })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn method_and_path_pairs_are_unique() {
        let mut seen = HashSet::new();
        for operation in Operation::all() {
            assert!(
                seen.insert((operation.method(), operation.path())),
                "{operation:?} repeats a route"
            );
        }
    }

    #[test]
    fn every_command_operation_exists_on_all_three_families() {
        let all = Operation::all();
        let count = |route: Route| {
            all.iter()
                .filter(|operation| operation.route() == Some(route))
                .count()
        };
        assert_eq!(count(Route::Any), 8);
        assert_eq!(count(Route::Device), 8);
        assert_eq!(count(Route::Me), 8);
    }
}
