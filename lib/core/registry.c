/* The registries: uid -> live connections (R7) and room -> member
 * connections (R15). Adding or removing a connection is O(1) apart from
 * the hash lookup of its uid or room (a room's members are an array with
 * swap-removal; it grows by doubling). A room's first
 * member and its last leaving are told to the server's router (rooms are
 * subscribed to while they have local members). */
#include <string.h>

#include "core/engine.h"
#include "core/shared.h"

im_user *reg_user_find(const im_server *s, const char *uid, size_t len) {
  strmap_node *n = strmap_get(&s->users, uid, len);
  return n ? (im_user *)n : NULL;
}

int reg_user_add(im_server *s, im_conn *c, const char *uid, size_t len) {
  im_user *u = reg_user_find(s, uid, len);
  if (!u) {
    u = im_alloc(s, sizeof(*u) + len + 1);
    if (!u) return IM_ENOMEM;
    memcpy(u->uid, uid, len);
    u->uid[len] = '\0';
    u->conns = NULL;
    u->nconns = 0;
    u->rate_tat = 0;
    u->sh = NULL;
    u->node.key = u->uid;
    u->node.klen = (uint32_t)len;
    strmap_put(&s->users, &u->node);
    s->st.users++;
  }
  c->user = u;
  c->u_prev = NULL;
  c->u_next = u->conns;
  if (u->conns) u->conns->u_prev = c;
  u->conns = c;
  u->nconns++;
  return 0;
}

void reg_user_del(im_server *s, im_conn *c) {
  im_user *u = c->user;
  if (!u) return;
  if (c->u_prev)
    c->u_prev->u_next = c->u_next;
  else
    u->conns = c->u_next;
  if (c->u_next) c->u_next->u_prev = c->u_prev;
  c->u_next = c->u_prev = NULL;
  c->user = NULL;
  if (u->sh) shared_user_put(s->shared, u->sh, s->shared_slot);
  if (--u->nconns == 0) {
    strmap_del(&s->users, &u->node);
    im_dealloc(s, u);
    s->st.users--;
  }
}

im_room *reg_room_find(const im_server *s, const char *room, size_t len) {
  strmap_node *n = strmap_get(&s->rooms, room, len);
  return n ? (im_room *)n : NULL;
}

/* Room records are freed when the last member leaves, unless a fan-out is
 * walking the room (it is freed when the walk ends). */
static void room_free(im_server *s, im_room *r) {
  if (s->router.room_close) s->router.room_close(s, r->name, s->router.ud);
  strmap_del(&s->rooms, &r->node);
  im_dealloc(s, r->m);
  im_dealloc(s, r);
  s->st.rooms--;
}

int reg_room_join(im_server *s, im_conn *c, const char *name, size_t len) {
  im_room *r = reg_room_find(s, name, len);
  if (r || s->cfg.max_rooms) {
    /* one walk of c's rooms: already a member, and how many it is in
     * (bounded by max_rooms, so a client cannot make this walk long) */
    uint32_t in = 0;
    for (room_member *m = c->rooms; m; m = m->c_next, in++)
      if (m->room == r) return 0;
    if (s->cfg.max_rooms && in >= s->cfg.max_rooms) return IM_ELIMIT;
  }
  bool fresh = !r;
  if (!r) {
    r = im_zalloc(s, sizeof(*r) + len + 1);
    if (!r) return IM_ENOMEM;
    memcpy(r->name, name, len);
    r->name[len] = '\0';
    r->node.key = r->name;
    r->node.klen = (uint32_t)len;
    strmap_put(&s->rooms, &r->node);
    s->st.rooms++;
  }
  room_member *m = im_alloc(s, sizeof(*m));
  if (m && r->n == r->cap) {
    uint32_t cap = r->cap ? r->cap * 2 : 4;
    room_slot *a = im_realloc(s, r->m, (size_t)cap * sizeof *a);
    if (a) {
      r->m = a;
      r->cap = cap;
    } else {
      im_dealloc(s, m);
      m = NULL;
    }
  }
  if (!m) {
    if (fresh) {
      strmap_del(&s->rooms, &r->node);
      im_dealloc(s, r->m);
      im_dealloc(s, r);
      s->st.rooms--;
    }
    return IM_ENOMEM;
  }
  m->room = r;
  m->at = r->n;
  r->m[r->n] = (room_slot){c, m};
  if (r->n++ == 0 && !(r->walks && !fresh) && s->router.room_open)
    s->router.room_open(s, r->name, s->router.ud);
  m->c_next = c->rooms;
  c->rooms = m;
  return 0;
}

static void member_unlink(im_server *s, room_member *m) {
  im_room *r = m->room;
  uint32_t last = --r->n;
  if (m->at != last) {
    r->m[m->at] = r->m[last];
    r->m[m->at].mb->at = m->at;
  }
  im_dealloc(s, m);
  if (r->n == 0 && !r->walks) room_free(s, r);
}

void reg_room_walk_end(im_server *s, im_room *r) {
  if (--r->walks == 0 && r->n == 0) room_free(s, r);
}
int reg_room_leave(im_server *s, im_conn *c, const char *name, size_t len) {
  im_room *r = reg_room_find(s, name, len);
  if (!r) return 0;
  for (room_member **pp = &c->rooms; *pp; pp = &(*pp)->c_next) {
    if ((*pp)->room == r) {
      room_member *m = *pp;
      *pp = m->c_next;
      member_unlink(s, m);
      return 1;
    }
  }
  return 0;
}

void reg_room_leave_all(im_server *s, im_conn *c) {
  while (c->rooms) {
    room_member *m = c->rooms;
    c->rooms = m->c_next;
    member_unlink(s, m);
  }
}
