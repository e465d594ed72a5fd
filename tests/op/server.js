// A real OpenID provider for twistauth's integration tests: panva's
// oidc-provider (OpenID Certified), configured for one confidential client
// (twistauth) on loopback.
//
// Environment:
//   OP_PORT              the port to listen on (127.0.0.1)
//   RP_BASE              twistauth's base URL, e.g. http://127.0.0.1:8081
//   OP_ACCESS_TOKEN_TTL  access token lifetime in seconds (default 4)
//
// Loopback notes: oidc-provider (v9) accepts a plain-http issuer and http
// redirect URIs for "web" clients using the code flow, so no TLS is needed
// here.  Its back-channel logout requests refuse special-use addresses
// (loopback included) by default, as SSRF protection; `fetch` below drops
// that guard for this test provider only.  The development login and
// consent forms (devInteractions) stand for a user: any login name signs in.

import Provider from 'oidc-provider';

const port = Number(process.env.OP_PORT);
const rp = process.env.RP_BASE;
if (!port || !rp) {
  console.error('OP_PORT and RP_BASE are required');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;

const configuration = {
  clients: [{
    client_id: 'twistauth',
    client_secret: 'twistauth-integration-secret-0123456789abcdef',
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: [`${rp}/redirect`],
    post_logout_redirect_uris: [`${rp}/logout/return`],
    backchannel_logout_uri: `${rp}/logout/backchannel`,
    backchannel_logout_session_required: true,
  }],
  features: {
    devInteractions: { enabled: true },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  pkce: { required: () => true },
  claims: {
    openid: ['sub'],
    profile: ['name'],
    email: ['email', 'email_verified'],
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, name: `Test ${id}`, email: `${id}@example.test`, email_verified: true };
      },
    };
  },
  ttl: {
    AccessToken: Number(process.env.OP_ACCESS_TOKEN_TTL || 4),
    AuthorizationCode: 60,
    IdToken: 600,
    RefreshToken: 3600,
    Grant: 3600,
    Session: 3600,
    Interaction: 600,
  },
  rotateRefreshToken: true,
  cookies: { keys: ['twistauth-integration-cookie-key'] },
  // Loopback back-channel calls: no SSRF guard (test provider only).
  fetch(url, options) {
    const { dispatcher, ...rest } = options;
    return fetch(url, rest);
  },
};

const provider = new Provider(issuer, configuration);
provider.on('backchannel.success', (ctx, client, accountId, sid) => {
  console.log(`backchannel.success ${client.clientId} ${accountId}`);
});
provider.on('backchannel.error', (ctx, error) => {
  console.log(`backchannel.error ${error.message}`);
});
provider.on('server_error', (ctx, error) => {
  console.log(`server_error ${error.message}`);
});
provider.on('grant.error', (ctx, error) => {
  console.log(`grant.error ${error.message}`);
});

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`listening ${issuer}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
