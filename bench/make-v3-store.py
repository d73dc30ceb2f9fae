#!/usr/bin/python3
# A schema-3 imd store (imd before 2026-12-01) to time the upgrade to schema 4:
#   bench/make-v3-store.py DATA/imd.db USERS [DAYS_OLD]
# USERS users, each with two inbox entries (a 1:1 message from its neighbour and
# one to the next), messages DAYS_OLD days old (default 1). Then start imd on DATA
# and time it to its "ws listening" line (docs/BENCHMARKS.md).
import os
import sqlite3
import sys
import time
path, n = sys.argv[1], int(sys.argv[2])
days = float(sys.argv[3]) if len(sys.argv) > 3 else 1
if os.path.exists(path): os.remove(path)
db = sqlite3.connect(path)
db.executescript('''
PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;
CREATE TABLE msgs(mid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, sender TEXT NOT NULL,
  device TEXT NOT NULL, cid TEXT, to_uid TEXT, grp TEXT, ts INTEGER NOT NULL, data TEXT NOT NULL, refs INTEGER NOT NULL);
CREATE TABLE idem(sender TEXT NOT NULL, device TEXT NOT NULL, cid TEXT NOT NULL, id TEXT NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY(sender, device, cid)) WITHOUT ROWID;
CREATE INDEX idem_ts ON idem(ts);
CREATE TABLE inbox(uid TEXT NOT NULL, seq INTEGER NOT NULL, mid INTEGER NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY(uid, seq)) WITHOUT ROWID;
CREATE INDEX inbox_ts ON inbox(ts);
CREATE TABLE users(uid TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, trimmed INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE cursors(uid TEXT NOT NULL, device TEXT NOT NULL, delivered INTEGER NOT NULL, PRIMARY KEY(uid, device)) WITHOUT ROWID;
CREATE TABLE grp_members(gid TEXT NOT NULL, uid TEXT NOT NULL, PRIMARY KEY(gid, uid)) WITHOUT ROWID;
CREATE TABLE meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
''')
t0 = int(time.time() * 1000) - int(days * 86400000)
db.executemany("INSERT INTO msgs VALUES(?,?,?,?,?,?,NULL,?,?,2)",
  ((i, str(400000000000000000 + i), 'u%07d' % i, 'd', 'c%d' % i, 'u%07d' % ((i + 1) % n), t0 + i, '{"t":"hello"}') for i in range(n)))
db.executemany("INSERT INTO idem VALUES(?,?,?,?,?)", (('u%07d' % i, 'd', 'c%d' % i, str(400000000000000000 + i), t0 + i) for i in range(n)))
# inbox: user i has seq 1 = msg i-1 (received), seq 2 = msg i (sent)
db.executemany("INSERT INTO inbox VALUES(?,?,?,?)", (('u%07d' % i, s, (i - 1) % n if s == 1 else i, t0 + i) for i in range(n) for s in (1, 2)))
db.executemany("INSERT INTO users VALUES(?,2,0)", (('u%07d' % i,) for i in range(n)))
db.execute("INSERT INTO meta VALUES('clean', 1)")
db.execute("PRAGMA user_version = 3")
db.commit()
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
db.close()
