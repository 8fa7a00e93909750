//! `tokenkeeper-mock-provider`: serves the mock OAuth provider for people's own integration
//! tests. Requests are logged without secrets (method, path, status).

// Production code keeps every function under 70 lines (clippy.toml sets the threshold);
// tests under `tests/` may be longer.
#![warn(clippy::too_many_lines)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use tokenkeeper_mock_provider::{
    ConsumerSpec, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, MockProfile, MockProvider,
};

/// A faithful local OAuth 2.0 provider (Bitbucket, Atlassian 3LO, GitHub App, Google).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on. The admin API answers loopback peers only.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Behaviour: bitbucket-legacy, bitbucket, atlassian-3lo, github-app or google.
    #[arg(long, default_value = "bitbucket")]
    profile: MockProfile,
    /// Client id of the registered consumer.
    #[arg(long, default_value = DEFAULT_CLIENT_ID)]
    client_id: String,
    /// Client secret of the registered consumer.
    #[arg(long, default_value = DEFAULT_CLIENT_SECRET, env = "MOCK_PROVIDER_CLIENT_SECRET")]
    client_secret: String,
    /// Redirect URIs must start with this.
    #[arg(long, default_value = "http://127.0.0.1")]
    redirect_prefix: String,
    /// The consumer's scopes, space separated.
    #[arg(long, default_value = "repository account")]
    scopes: String,
    /// Access token lifetime in seconds (default: the profile's).
    #[arg(long)]
    access_ttl_secs: Option<u64>,
    /// Seed for tokens and probabilistic faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Allow a --host other people can reach. The mock approves every authorization without a
    /// login and its tokens are predictable: never where real users or credentials are.
    #[arg(long)]
    insecure_public: bool,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let consumer = ConsumerSpec::new(&args.client_id, &args.client_secret)
        .redirect_prefix(&args.redirect_prefix)
        .scopes(args.scopes.split_whitespace());
    let mut builder = MockProvider::builder()
        .profile(args.profile)
        .consumer(consumer)
        .seed(args.seed)
        .addr(SocketAddr::new(args.host, args.port))
        .insecure_public(args.insecure_public);
    if let Some(secs) = args.access_ttl_secs {
        builder = builder.access_ttl(Duration::from_secs(secs));
    }
    let mock = builder.start().await?;
    println!(
        "TEST DOUBLE: this mock OAuth provider approves every authorization without a login and issues predictable tokens; never use it for real users or real credentials."
    );
    println!(
        "mock OAuth provider ({}) listening on {}",
        args.profile,
        mock.base_url()
    );
    println!("  authorize: {}", mock.authorize_url());
    println!("  token:     {}", mock.token_url());
    println!("  revoke:    {}", mock.revoke_url());
    println!("  resource:  {}", mock.resource_url());
    println!(
        "  admin:     {} (loopback only, with: Authorization: Bearer {})",
        mock.admin_url(),
        mock.admin_token()
    );
    println!("  client id: {} (secret as configured)", args.client_id);
    tokio::signal::ctrl_c().await?;
    mock.shutdown().await;
    Ok(())
}
