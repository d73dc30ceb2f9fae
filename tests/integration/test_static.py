#!/usr/bin/python3
"""imd --static DIR over real HTTP: files at / of the HTTP listener, the API
untouched under /v1/, /healthz and /metrics.

Run:  IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_static.py

The web root is built in a temporary directory with files of every served
type, a subdirectory with its index, a hidden file, a FIFO, a file over the
16 MiB bound (sparse), a symlink pointing inside and two pointing outside
(a file and a directory next to the root holding a secret).
"""
import os
import shutil
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (Imd, ImdCase, assert_clean_exit, http_call, raw_http,  # noqa: E402
                       request_bytes)

FILES = {
    'index.html': (b'<!doctype html><title>root</title>', 'text/html; charset=utf-8'),
    'app.js': (b'export const x = 1;\n', 'text/javascript; charset=utf-8'),
    'style.css': (b'body { color: red }\n', 'text/css; charset=utf-8'),
    'data.json': (b'{"a":1}', 'application/json'),
    'logo.png': (b'\x89PNG\r\n\x1a\n' + bytes(range(256)), 'image/png'),
    'logo.svg': (b'<svg xmlns="http://www.w3.org/2000/svg"/>', 'image/svg+xml'),
    'favicon.ico': (b'\x00\x00\x01\x00', 'image/x-icon'),
    'notes.txt': (b'plain\n', 'text/plain; charset=utf-8'),
    'blob.bin': (b'\x00\x01\x02', 'application/octet-stream'),
    'UPPER.HTML': (b'<p>upper</p>', 'text/html; charset=utf-8'),
    'empty.txt': (b'', 'text/plain; charset=utf-8'),
    'with space.txt': (b'spaced', 'text/plain; charset=utf-8'),
    'sub/index.html': (b'<p>sub</p>', 'text/html; charset=utf-8'),
    'sub/deep/x.js': (b'1', 'text/javascript; charset=utf-8'),
}
SECRET = b'outside the web root: never served'


class StaticCase(ImdCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix='imd-static-')
        root = cls.root = os.path.join(cls.tmp, 'www')
        for name, (body, _) in FILES.items():
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), 'wb') as f:
                f.write(body)
        with open(os.path.join(cls.tmp, 'secret.txt'), 'wb') as f:
            f.write(SECRET)
        os.makedirs(os.path.join(cls.tmp, 'private'))
        with open(os.path.join(cls.tmp, 'private', 'key.txt'), 'wb') as f:
            f.write(SECRET)
        # root-ish names next to the root: a prefix check without '/' would pass them
        os.makedirs(os.path.join(cls.tmp, 'www2'))
        with open(os.path.join(cls.tmp, 'www2', 'x.txt'), 'wb') as f:
            f.write(SECRET)
        with open(os.path.join(root, '.hidden'), 'wb') as f:
            f.write(SECRET)
        os.symlink('../secret.txt', os.path.join(root, 'out.txt'))
        os.symlink(os.path.join(cls.tmp, 'private'), os.path.join(root, 'outdir'))
        os.symlink('../www2/x.txt', os.path.join(root, 'sibling.txt'))
        os.symlink('notes.txt', os.path.join(root, 'in.txt'))
        os.symlink('sub/deep/x.js', os.path.join(root, 'alias.css'))
        os.mkfifo(os.path.join(root, 'pipe.txt'))
        with open(os.path.join(root, 'huge.bin'), 'wb') as f:
            f.truncate((16 << 20) + 1)
        cls.srv = Imd('--static', root)

    @classmethod
    def tearDownClass(cls):
        rc, log = cls.srv.stop()
        cls.srv.remove_data()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        assert_clean_exit(rc, log)

    def get(self, path, method='GET', **kw):
        kw.setdefault('key', None)      # static files need no API key
        return http_call(self.srv.http, method, path, **kw)

    def raw(self, path, method='GET', extra=''):
        return raw_http(self.srv.http, request_bytes(method, path, key=None, extra=extra), 1)[0]

    def assert_json_error(self, r, status):
        self.assertEqual(r.status, status, r)
        self.assertEqual(r.ctype, 'application/json', r)
        self.assertIsInstance(r.json.get('error'), str, r)
        self.assertNotIn(SECRET, r.body)

    def test_files_and_types(self):
        for name, (body, ctype) in FILES.items():
            path = '/' + name.replace(' ', '%20')
            with self.subTest(path=path):
                r = self.get(path)
                self.assertEqual((r.status, r.ctype, r.body), (200, ctype, body))
                self.assertEqual(r.headers['content-length'], str(len(body)))
                self.assertEqual(r.headers['cache-control'], 'no-cache')
                self.assertRegex(r.headers['etag'], r'^"[0-9a-f]+-[0-9a-f]+"$')

    def test_index(self):
        for path, body in (('/', FILES['index.html'][0]), ('/sub/', FILES['sub/index.html'][0])):
            r = self.get(path)
            self.assertEqual((r.status, r.ctype, r.body), (200, 'text/html; charset=utf-8', body))
        self.assert_json_error(self.get('/sub'), 404)          # a directory is not a file
        self.assert_json_error(self.get('/sub/deep/'), 404)    # no index there

    def test_head(self):
        r = self.get('/app.js', 'HEAD')
        self.assertEqual((r.status, r.ctype, r.body), (200, 'text/javascript; charset=utf-8', b''))
        self.assertEqual(r.headers['content-length'], str(len(FILES['app.js'][0])))
        self.assertIn('etag', r.headers)

    def test_etag_304(self):
        r = self.get('/style.css')
        etag = r.headers['etag']
        for inm in (etag, 'W/' + etag, '"nope", ' + etag, '*'):
            with self.subTest(inm=inm):
                r2 = self.get('/style.css', headers={'If-None-Match': inm})
                self.assertEqual((r2.status, r2.body), (304, b''), r2)
                self.assertEqual(r2.headers['etag'], etag)
                self.assertNotIn('content-length', r2.headers)
        r3 = self.get('/style.css', headers={'If-None-Match': '"other"'})
        self.assertEqual((r3.status, r3.body), (200, FILES['style.css'][0]))
        # another file has another tag; a changed file a new one
        self.assertNotEqual(self.get('/app.js').headers['etag'], etag)
        p = os.path.join(self.root, 'changing.txt')
        with open(p, 'wb') as f:
            f.write(b'one')
        e1 = self.get('/changing.txt').headers['etag']
        with open(p, 'wb') as f:
            f.write(b'two!')
        r4 = self.get('/changing.txt', headers={'If-None-Match': e1})
        self.assertEqual((r4.status, r4.body), (200, b'two!'))
        os.unlink(p)

    def test_traversal_refused(self):
        for path in ('/../secret.txt', '/../../../../etc/passwd', '/sub/../../secret.txt',
                     '/%2e%2e/secret.txt', '/%2E%2E/secret.txt', '/.%2e/secret.txt',
                     '/sub/%2e%2e/%2e%2e/secret.txt', '/..%2fsecret.txt', '/sub%2f..%2f..%2fsecret.txt',
                     '/%2fetc/passwd', '/%5c..%5csecret.txt', '/..\\secret.txt',
                     '/%00', '/notes.txt%00.html', '/./notes.txt', '/sub/./index.html',
                     '//etc/passwd', '/sub//index.html', '/.hidden', '/%2ehidden',
                     '/%', '/%2', '/%zz', 'notes.txt', '/a%0a.txt'):
            with self.subTest(path=path):
                r = self.raw(path)
                self.assertIn(r.status, (400, 404), r)
                self.assert_json_error(r, r.status)

    def test_symlinks(self):
        for path in ('/out.txt', '/outdir/key.txt', '/sibling.txt'):
            with self.subTest(path=path):
                r = self.get(path)
                self.assertIn(r.status, (403, 404), r)
                self.assert_json_error(r, r.status)
        r = self.get('/in.txt')                            # a link inside the root is served
        self.assertEqual((r.status, r.body), (200, FILES['notes.txt'][0]))
        r = self.get('/alias.css')                         # typed by the name asked for
        self.assertEqual((r.status, r.ctype, r.body), (200, 'text/css; charset=utf-8', b'1'))

    def test_not_regular_and_too_large(self):
        self.assert_json_error(self.get('/pipe.txt'), 404)
        self.assert_json_error(self.get('/huge.bin'), 413)
        self.assert_json_error(self.get('/missing.js'), 404)
        self.assert_json_error(self.get('/sub/missing/x.js'), 404)

    def test_methods(self):
        for method in ('POST', 'PUT', 'DELETE'):
            with self.subTest(method=method):
                self.assert_json_error(self.raw('/index.html', method), 405)

    def test_api_unchanged(self):
        r = self.get('/healthz')
        self.assertEqual((r.status, r.json), (200, {'status': 'ok'}))
        for path in ('/metrics', '/v1/gateways', '/v1/users/u/presence', '/v1', '/v1/'):
            with self.subTest(path=path):
                self.assert_json_error(self.get(path), 401)    # still needs the key
        self.assertEqual(http_call(self.srv.http, 'GET', '/metrics').status, 200)
        self.assertEqual(http_call(self.srv.http, 'GET', '/v1/gateways?uid=a').status, 200)
        r = http_call(self.srv.http, 'GET', '/v1/nothing')
        self.assert_json_error(r, 404)
        # a path that only starts like the API is a file
        self.assert_json_error(self.get('/v1x'), 404)
        self.assert_json_error(self.get('/healthzz'), 404)

    def test_keep_alive_mixed(self):
        import http.client
        conn = http.client.HTTPConnection('127.0.0.1', self.srv.http, timeout=10)
        try:
            for path, key in (('/', None), ('/healthz', None), ('/app.js', None),
                              ('/metrics', True), ('/style.css', None)):
                r = http_call(self.srv.http, 'GET', path, conn=conn,
                              **({} if key else {'key': None}))
                self.assertEqual(r.status, 200, path)
        finally:
            conn.close()


class TestStaticOptions(unittest.TestCase):
    def test_not_a_directory_exits_2(self):
        import subprocess
        from imdclient import imd_path
        with tempfile.NamedTemporaryFile() as f:
            for arg in (f.name, '/nonexistent/dir'):
                with self.subTest(arg=arg):
                    p = subprocess.run([imd_path(), '--static', arg, '--ws', '127.0.0.1:0',
                                        '--tcp', 'off', '--http', '127.0.0.1:0', '--data',
                                        tempfile.gettempdir() + '/imd-static-never'],
                                       capture_output=True, timeout=10)
                    self.assertEqual(p.returncode, 2, p.stderr)
                    self.assertIn(b'static', p.stderr)

    def test_without_static_every_path_is_the_api(self):
        srv = Imd()
        try:
            r = http_call(srv.http, 'GET', '/', key=None)
            self.assertEqual(r.status, 401)          # as before: every path is the API's
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            assert_clean_exit(rc, log)


if __name__ == '__main__':
    unittest.main(verbosity=2)
