"""imd's structured log: one JSON object per line with ts, level, src and
msg (and fields), levels, and reopening the file on SIGHUP (logrotate).

Run: IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_logs.py
"""
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import Imd, api, assert_clean_exit, check, run_cli, scenario  # noqa: E402


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


async def wait_for_line(path, pred, what, timeout=5):
    t0 = time.monotonic()
    while True:
        if os.path.exists(path) and any(pred(x) for x in lines(path)):
            return
        check(time.monotonic() - t0 < timeout, 'no log line: %s' % what)
        await asyncio.sleep(0.05)


class TestLog(unittest.TestCase):
    @scenario(60)
    async def test_json_lines_levels_and_reopen(self):
        d = tempfile.mkdtemp(prefix='imd-log-')
        log = os.path.join(d, 'imd.log')
        srv = Imd('--log-file', log, '--log-level', 'debug')
        self.addCleanup(srv.remove_data)
        self.addCleanup(lambda: srv.alive() and srv.kill())
        r = await api(srv, 'GET', '/v1/users/bob/presence')
        check(r.status == 200, 'presence: %r' % r)
        await wait_for_line(log, lambda x: x['msg'] == 'http request', 'the access line')
        for x in lines(log):
            check(set(x) >= {'ts', 'level', 'src', 'msg'}, 'fields: %r' % x)
            check(re.match(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$', x['ts']), 'ts %r' % x)
            check(x['level'] in ('debug', 'info', 'warn', 'error'), 'level %r' % x)
            check(re.match(r'^[a-z_]+\.c:\d+$', x['src']), 'src %r' % x)
        acc = [x for x in lines(log) if x['msg'] == 'http request'][-1]
        # presence is answered later (deferred): logged with the status it got
        check((acc['method'], acc['path'], acc['status']) ==
              ('GET', '/v1/users/bob/presence', '200'), 'access line %r' % acc)
        # a stored push (answered after the commit) and a refused one
        r = await api(srv, 'POST', '/v1/messages', {'to': 'bob', 'data': {'n': 1}})
        check(r.status == 200, 'push: %r' % r)
        r = await api(srv, 'POST', '/v1/messages', {'data': {'n': 1}})
        check(r.status == 400, 'push without receivers: %r' % r)
        await wait_for_line(log, lambda x: x.get('status') == '400', 'the refused push')
        pushes = [(x['method'], x['status']) for x in lines(log)
                  if x['msg'] == 'http request' and x['path'] == '/v1/messages']
        check(pushes == [('POST', '200'), ('POST', '400')], 'push lines %r' % pushes)
        # logrotate: move the file away, SIGHUP, imd writes to a new one
        os.rename(log, log + '.1')
        srv.proc.send_signal(signal.SIGHUP)
        await wait_for_line(log, lambda x: x['msg'] == 'log reopened', 'the reopened log')
        await api(srv, 'GET', '/healthz', key=None)
        await wait_for_line(log, lambda x: x.get('path') == '/healthz', 'a line after the reopen')
        check(srv.alive(), 'SIGHUP ended imd')
        assert_clean_exit(*srv.stop())
        os.unlink(log)
        os.unlink(log + '.1')
        os.rmdir(d)

    @scenario(30)
    async def test_level_filters_and_bad_level(self):
        d = tempfile.mkdtemp(prefix='imd-log-')
        log = os.path.join(d, 'imd.log')
        srv = Imd('--log-file', log, '--log-level', 'warn')
        self.addCleanup(srv.remove_data)
        self.addCleanup(lambda: srv.alive() and srv.kill())
        for _ in range(5):
            await api(srv, 'GET', '/healthz', key=None)
        assert_clean_exit(*srv.stop())
        check(all(x['level'] in ('warn', 'error') for x in lines(log)), 'info under warn')
        rc, _, err = run_cli('--log-level', 'loud', '--data', d)
        check(rc == 2 and 'log-level' in err, 'bad level: %d %r' % (rc, err))
        os.unlink(log)


if __name__ == '__main__':
    unittest.main(verbosity=2)
