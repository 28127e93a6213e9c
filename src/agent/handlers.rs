// Temporary stand-in until the full handlers land: built-in echo only.
use std::path::Path;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::CommandType;

pub struct HandlerRequest {
    pub command_id: Uuid,
    pub command_type: CommandType,
    pub app_service_name: Option<String>,
    pub package_family_name: Option<String>,
    pub payload: Option<serde_json::Value>,
}

pub enum HandlerOutcome {
    Completed {
        response: Option<serde_json::Value>,
    },
    Failed {
        error: String,
        response: Option<serde_json::Value>,
    },
    Canceled,
}

#[derive(Clone)]
pub struct Handlers;

impl Handlers {
    pub fn builtin() -> Self {
        Self
    }

    pub fn load(_path: &Path) -> anyhow::Result<Self> {
        Ok(Self)
    }

    pub async fn run(
        &self,
        request: &HandlerRequest,
        _cancel: &CancellationToken,
    ) -> HandlerOutcome {
        match request.app_service_name.as_deref() {
            Some("echo") => HandlerOutcome::Completed {
                response: request.payload.clone(),
            },
            other => HandlerOutcome::Failed {
                error: format!("no handler for app service {other:?} on this device"),
                response: None,
            },
        }
    }
}
