//! Errors as HTTP responses: a status and `{"error": {"message", "type"}}` (OpenAI's shape).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// What a 503 tells clients to wait before they retry, in seconds.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// An error answered to the client.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }

    /// 404: no such adapter, version or tag.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, message: message.into() }
    }

    /// 503 with `Retry-After`: the server is at capacity, or the request ran past its
    /// deadline; the same request later may succeed.
    pub fn busy(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into() }
    }

    /// 500: the server failed.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into() }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 | 422 => "invalid_request_error",
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            409 => "incompatible_adapter_error",
            503 => "unavailable_error",
            _ => "server_error",
        }
    }
}

impl From<adapters_store::Error> for ApiError {
    fn from(e: adapters_store::Error) -> Self {
        use adapters_store::Error as E;
        let status = match &e {
            E::Invalid(_) => StatusCode::BAD_REQUEST,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            // The store holds a damaged version: the server is fine, its upstream is not.
            E::Corrupt(_) => StatusCode::BAD_GATEWAY,
            // The store cannot be reached now (an outage, a network fault): retry later.
            E::Backend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            E::File { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"message": self.message, "type": self.kind(), "code": self.status.as_u16()}});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

/// A JSON body, or a 400/413/415 that says what is wrong with it.
pub(crate) fn body<T>(payload: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    payload.map(|axum::Json(t)| t).map_err(|r| ApiError { status: r.status(), message: format!("request body: {}", r.body_text()) })
}
