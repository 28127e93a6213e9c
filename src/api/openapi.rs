//! The OpenAPI 3.1 document at `GET /openapi.json`, built with utoipa from
//! [`Operation::all`] and the schemas the response types derive.

use std::sync::OnceLock;

use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use utoipa::ToSchema;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref,
    RefOr, Required, ResponseBuilder, Tag,
};

use super::MAX_BODY_BYTES;
use super::commands::Route;
use super::error::ErrorBody;
use super::filter;
use super::query::{DEFAULT_TOP, MAX_TOP};
use super::routes::Operation;
use super::views::{
    CommandPage, CreateCommandRequest, PostbackCollection, ResendAccepted, TransitionCollection,
};
use crate::command::{PostbackSummary, Representation};
use crate::domain::MAX_DEVICE_ID_BYTES;

const BEARER: &str = "bearer";
const JSON: &str = "application/json";

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let text = DOCUMENT.get_or_init(|| {
        document()
            .to_json()
            .expect("the OpenAPI document always serializes")
    });
    ([(header::CONTENT_TYPE, JSON)], text.as_str()).into_response()
}

/// Returns the path of `operation` as OpenAPI writes it, with Graph's parameter name
/// `{deviceId}`.
pub fn openapi_path(operation: Operation) -> String {
    operation.path().replace("{device_id}", "{deviceId}")
}

/// Builds the whole document.
pub fn document() -> OpenApi {
    let mut paths = PathsBuilder::new().build();
    for operation in Operation::all() {
        paths.add_path_operation(
            openapi_path(operation),
            vec![http_method(&operation.method())],
            describe(operation),
        );
    }
    let info = InfoBuilder::new()
        .title("command-dispatcher")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Device commands in the shape of Microsoft Graph's command API. \
             Every route except /health, /health/ready and /openapi.json needs a bearer token \
             with the Device.Command scope. Error bodies have Graph's shape and carry the \
             request-id in error.innerError.",
        ))
        .build();
    OpenApiBuilder::new()
        .info(info)
        .paths(paths)
        .components(Some(components()))
        .tags(Some([Tag::new("commands"), Tag::new("service")]))
        .build()
}

fn http_method(method: &Method) -> HttpMethod {
    if method == Method::POST {
        HttpMethod::Post
    } else {
        HttpMethod::Get
    }
}

fn components() -> utoipa::openapi::Components {
    let mut schemas = Vec::new();
    collect::<Representation<'static>>(&mut schemas);
    collect::<PostbackSummary>(&mut schemas);
    collect::<CommandPage<'static>>(&mut schemas);
    collect::<TransitionCollection>(&mut schemas);
    collect::<PostbackCollection>(&mut schemas);
    collect::<ResendAccepted>(&mut schemas);
    collect::<CreateCommandRequest>(&mut schemas);
    collect::<ErrorBody>(&mut schemas);
    let bearer = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .description(Some(
            "HS256 JWT with a sub claim and the Device.Command scope in scp; \
             `dispatcher token --subject NAME` prints one.",
        ))
        .build();
    ComponentsBuilder::new()
        .schemas_from_iter(schemas)
        .security_scheme(BEARER, SecurityScheme::Http(bearer))
        .build()
}

/// Adds `T` and the schemas it refers to.
fn collect<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

fn describe(operation: Operation) -> utoipa::openapi::path::Operation {
    let (id, summary) = name(operation);
    let tag = if operation.route().is_some() {
        "commands"
    } else {
        "service"
    };
    let mut builder = OperationBuilder::new()
        .operation_id(Some(id))
        .summary(Some(summary))
        .tag(tag);
    if operation.path().contains("{device_id}") {
        builder = builder.parameter(
            ParameterBuilder::new()
                .name("deviceId")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(format!(
                    "1 to {MAX_DEVICE_ID_BYTES} ASCII letters, digits and - . _ : @ ~"
                )))
                .schema(Some(string_schema())),
        );
    }
    if operation.path().contains("{id}") {
        builder = builder.parameter(
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The command id returned by the create"))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String).format(
                    Some(utoipa::openapi::SchemaFormat::KnownFormat(
                        utoipa::openapi::KnownFormat::Uuid,
                    )),
                ))),
        );
    }
    if matches!(operation, Operation::ListCommands(_)) {
        for (name, description) in [
            (
                "$top",
                format!("Page size, 1 to {MAX_TOP}; default {DEFAULT_TOP}."),
            ),
            (
                "$filter",
                format!(
                    "Filter on Status and CreatedDateTime; {}.",
                    filter::SUPPORTED
                ),
            ),
            (
                "$skiptoken",
                "Opaque position from @odata.nextLink; do not build it.".to_owned(),
            ),
        ] {
            builder = builder.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(description))
                    .schema(Some(string_schema())),
            );
        }
    }
    if matches!(operation, Operation::CreateCommand(_)) {
        builder = builder
            .parameter(
                ParameterBuilder::new()
                    .name("Idempotency-Key")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::False)
                    .description(Some(
                        "1 to 255 printable ASCII characters. A repeat with the same key, route \
                         and body returns the first command with Idempotent-Replayed: true; the \
                         same key with another route or body returns 409.",
                    ))
                    .schema(Some(string_schema())),
            )
            .request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .description(Some(format!("At most {MAX_BODY_BYTES} bytes.")))
                    .content(JSON, json_content("CreateCommandRequest"))
                    .build(),
            ));
    }
    for (status, description, schema) in responses(operation) {
        let mut response = ResponseBuilder::new().description(description);
        if let Some(schema) = schema {
            response = response.content(JSON, json_content(schema));
        } else if status < 300 {
            response = response.content(
                JSON,
                ContentBuilder::new()
                    .schema(Some(Schema::Object(Object::new())))
                    .build(),
            );
        }
        builder = builder.response(status.to_string(), response.build());
    }
    if operation.requires_token() {
        builder = builder.security(SecurityRequirement::new(BEARER, Vec::<String>::new()));
    }
    builder.build()
}

fn string_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn json_content(schema: &str) -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(schema)))
        .build()
}

/// Returns the operation id and summary, with the family in both.
fn name(operation: Operation) -> (String, String) {
    let (verb, what) = match operation {
        Operation::Health => return ("health".into(), "Liveness check".into()),
        Operation::Ready => {
            return (
                "ready".into(),
                "Readiness: the database and the broker answer".into(),
            );
        }
        Operation::OpenApi => return ("openApi".into(), "This OpenAPI document".into()),
        Operation::ListCommands(_) => ("list", "Commands"),
        Operation::CreateCommand(_) => ("create", "Command"),
        Operation::GetCommand(_) => ("get", "Command"),
        Operation::GetResponsePayload(_) => ("get", "CommandResponsePayload"),
        Operation::GetHistory(_) => ("get", "CommandHistory"),
        Operation::ListPostbacks(_) => ("list", "CommandPostbacks"),
        Operation::ResendPostback(_) => ("resend", "CommandPostback"),
        Operation::CancelCommand(_) => ("cancel", "Command"),
    };
    let (family, scope) = match operation.route() {
        Some(Route::Device) => ("Device", " of a device"),
        Some(Route::Me) => ("MyDevice", " of a device, created by the caller"),
        _ => ("", ""),
    };
    let summary = match operation {
        Operation::ListCommands(_) => "List commands, newest first",
        Operation::CreateCommand(_) => "Create a command",
        Operation::GetCommand(_) => "Get a command",
        Operation::GetResponsePayload(_) => "Get the payload the device answered with",
        Operation::GetHistory(_) => "Get the statuses a command reached, oldest first",
        Operation::ListPostbacks(_) => "List the postback deliveries of a command",
        Operation::ResendPostback(_) => "Send the postback of a final command again",
        _ => "Cancel a command",
    };
    (format!("{verb}{family}{what}"), format!("{summary}{scope}"))
}

type Described = (u16, &'static str, Option<&'static str>);

/// Status, description and body schema of each response an operation has.
fn responses(operation: Operation) -> Vec<Described> {
    const ERROR: Option<&str> = Some("ErrorResponse");
    let mut list: Vec<Described> = match operation {
        Operation::Health | Operation::OpenApi => return vec![(200, "OK", None)],
        Operation::Ready => {
            return vec![
                (200, "The database and the broker answer", None),
                (503, "The database or the broker does not answer", None),
            ];
        }
        Operation::ListCommands(_) => vec![
            (200, "One page of commands", Some("CommandCollection")),
            (400, "A query option or the deviceId is invalid", ERROR),
        ],
        Operation::CreateCommand(_) => vec![
            (
                201,
                "The command is queued; a repeat with the same Idempotency-Key also returns 201, with Idempotent-Replayed: true",
                Some("Command"),
            ),
            (400, "The body, a header or the deviceId is invalid", ERROR),
            (
                409,
                "The Idempotency-Key was used for a different request",
                ERROR,
            ),
            (413, "The body is larger than the limit", ERROR),
            (415, "Content-Type is not application/json", ERROR),
            (
                429,
                "The device has the maximum number of unfinished commands",
                ERROR,
            ),
        ],
        Operation::GetCommand(_) => vec![(200, "The command", Some("Command"))],
        Operation::GetResponsePayload(_) => {
            vec![(
                200,
                "The JSON value the device answered with, or null",
                None,
            )]
        }
        Operation::GetHistory(_) => vec![(200, "The transitions", Some("TransitionCollection"))],
        Operation::ListPostbacks(_) => {
            vec![(200, "The deliveries", Some("PostbackCollection"))]
        }
        Operation::ResendPostback(_) => vec![
            (202, "A new delivery is queued", Some("ResendAccepted")),
            (409, "The command is not final or has no PostBackUri", ERROR),
        ],
        Operation::CancelCommand(_) => vec![
            (
                200,
                "The command was queued and is now canceled",
                Some("Command"),
            ),
            (
                202,
                "The command reached its device; the agent is asked to stop it and the final status tells what happened",
                Some("Command"),
            ),
            (409, "The command is already final", ERROR),
        ],
    };
    if !matches!(
        operation,
        Operation::ListCommands(_) | Operation::CreateCommand(_)
    ) {
        list.push((400, "The deviceId or the command id is invalid", ERROR));
        list.push((404, "No such command is visible through this route", ERROR));
    }
    list.extend([
        (401, "The bearer token is missing or invalid", ERROR),
        (403, "The token lacks the Device.Command scope", ERROR),
        (
            503,
            "The database is busy; retry after Retry-After seconds",
            ERROR,
        ),
    ]);
    list
}
