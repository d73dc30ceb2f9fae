/* The authentication state machine (auth.c): the auth op, the upgrade
 * request's credentials, pending verdicts and token refresh. */
#ifndef IM_CORE_AUTH_H
#define IM_CORE_AUTH_H

#include "core/engine.h"
#include "proto/ws_handshake.h"

/* Answer the upgrade request with an HTTP error and close once it is sent. */
void auth_http_reject(im_server *s, im_conn *c, int status, const char *reason);
/* Queue the 101 response of a finished handshake. */
void auth_send_upgrade(im_server *s, im_conn *c, const ws_hs_result *res);
/* Run on_auth for credentials `a`; returns false when input must pause
 * (the verdict is pending: park the credentials with auth_park). */
bool auth_start(im_server *s, im_conn *c, im_auth *a);
/* Keep a pending auth's uid/device/platform and since on c. Returns 0 or
 * IM_ENOMEM. */
int auth_park(im_server *s, im_conn *c, const im_auth *a);
/* An auth op: the first authentication, or a refresh on an open connection. */
void auth_on_op(im_server *s, im_conn *c, const imp_packet *p);
/* im_auth_complete's verdict on c. Returns 0, IM_ESTATE (nothing pending);
 * *resume is set when held input may be processed again. */
int auth_complete(im_server *s, im_conn *c, int accept, int code, const char *reason,
                  bool *resume);

#endif
