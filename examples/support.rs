//! What the self-testing examples share (`#[path = "support.rs"] mod support;`): a consumer
//! pointed at the mock provider, and an installation made through the mock's automatic
//! approval, as a browser and the provider's consent page would make it.

use std::collections::HashMap;

use tokenkeeper::{ConsumerConfig, InstallationId, TokenManager, profiles};
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProvider};

/// Errors the examples pass up.
pub type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Where the examples' authorizations return (the mock never calls it).
const REDIRECT: &str = "http://127.0.0.1/callback";

/// The Bitbucket consumer the mock registers, with every endpoint on the mock.
pub fn mock_consumer(mock: &MockProvider) -> Fallible<ConsumerConfig> {
    let url = |s: String| reqwest::Url::parse(&s);
    Ok(ConsumerConfig::builder(
        profiles::bitbucket()
            .with_endpoints(
                url(mock.authorize_url())?,
                url(mock.token_url())?,
                Some(url(mock.revoke_url())?),
            )
            .with_identity_endpoint(url(mock.resource_url())?),
    )
    .client_id(DEFAULT_CLIENT_ID)
    .client_secret(DEFAULT_CLIENT_SECRET)
    .redirect_uri(REDIRECT)
    // One process here; a fleet loads one shared key: StateKey::from_base64(1, &secret).
    .state_key(tokenkeeper::StateKey::generate(1)?)
    .build()?)
}

/// One new installation: the flow begun, approved at the mock, completed.
pub async fn install(manager: &TokenManager, mock: &MockProvider) -> Fallible<InstallationId> {
    let begun = manager.begin_authorization(None)?;
    let query: HashMap<_, _> = begun.url.query_pairs().into_owned().collect();
    let challenge = query.get("code_challenge").map(|c| (c.as_str(), "S256"));
    let code = mock.authorize_code(DEFAULT_CLIENT_ID, Some(REDIRECT), challenge)?;
    Ok(manager
        .complete_authorization(
            tokenkeeper::AuthorizationCode::new(code),
            &begun.state,
            &begun.binding,
        )
        .await?
        .installation)
}
