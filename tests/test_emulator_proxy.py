"""Emulator as an HTTP forward proxy: the real endpoint names in virtual-hosted style (oss2 + requests)."""

import json

import oss2
import pytest
import requests
from aliyunsdkcore.client import AcsClient
from aliyunsdksts.request.v20150401.AssumeRoleRequest import AssumeRoleRequest
from oss2.credentials import StaticCredentialsProvider

from tests.ossemu.errors import OSSError
from tests.ossemu.hosts import Endpoints

pytestmark = pytest.mark.timeout(60)
PART = 100 * 1024


def proxies(emu):
    return {"http": emu.oss_url}


def named_bucket(emu, key_id=None, secret=None, token=None, version="v4", path_style=False):
    provider = StaticCredentialsProvider(key_id or emu.root.id, secret or emu.root.secret, token)
    auth = oss2.ProviderAuthV4(provider) if version == "v4" else oss2.ProviderAuth(provider)
    return oss2.Bucket(auth, emu.oss_endpoint, "drop", region=emu.region, proxies=proxies(emu),
                       is_path_style=path_style)


def oss_error(fn, *a, **kw):
    with pytest.raises(oss2.exceptions.OssError) as ei:
        fn(*a, **kw)
    return ei.value


@pytest.mark.parametrize("version", ["v1", "v4"])
def test_virtual_hosted_object_and_bucket_ops(emulator, root_bucket, version):
    b = named_bucket(emulator, version=version)
    assert b._make_url("drop", "a b/ü.txt") == "http://drop.oss-cn-hangzhou.aliyuncs.com/a%20b%2F%C3%BC.txt"
    data = b"virtual hosted " * 1000
    assert b.put_object("a b/ü.txt", data).status == 200
    assert b.get_object("a b/ü.txt").read() == data
    assert root_bucket.get_object("a b/ü.txt").read() == data          # the same bucket, path style
    assert b.head_object("a b/ü.txt").content_length == len(data)
    assert [o.key for o in oss2.ObjectIteratorV2(b)] == ["a b/ü.txt"]    # bucket level: GET / on the host
    assert [o.key for o in oss2.ObjectIterator(b, prefix="a b/")] == ["a b/ü.txt"]

    up = b.init_multipart_upload("mp.bin").upload_id
    parts = [b.upload_part("mp.bin", up, n, bytes([n]) * PART) for n in (1, 2)]
    assert [u.upload_id for u in b.list_multipart_uploads().upload_list] == [up]
    assert [p.part_number for p in b.list_parts("mp.bin", up).parts] == [1, 2]
    b.complete_multipart_upload("mp.bin", up, [oss2.models.PartInfo(n, p.etag) for n, p in zip((1, 2), parts)])
    assert root_bucket.get_object("mp.bin").read() == b"\x01" * PART + b"\x02" * PART
    assert b.delete_object("mp.bin").status == 204 and not root_bucket.object_exists("mp.bin")


@pytest.mark.parametrize("version", ["v1", "v4"])
def test_virtual_hosted_presigned_urls(emulator, root_bucket, version):
    root_bucket.put_object("dir/signed file.txt", b"signed")
    b = named_bucket(emulator, version=version)
    url = b.sign_url("GET", "dir/signed file.txt", 300, slash_safe=True)
    assert url.startswith("http://drop.oss-cn-hangzhou.aliyuncs.com/dir/signed%20file.txt?")
    r = requests.get(url, proxies=proxies(emulator), timeout=10)
    assert r.status_code == 200 and r.content == b"signed"
    tampered = url.replace("signed%20file", "other%20file")
    assert requests.get(tampered, proxies=proxies(emulator), timeout=10).status_code == 403


def test_path_style_on_a_name_is_refused(emulator, root_bucket):
    root_bucket.put_object("k", b"x")
    e = oss_error(named_bucket(emulator, path_style=True).get_object, "k")
    assert (e.status, e.code, e.message) == (403, "SecondLevelDomainForbidden",
                                             "Please use virtual hosted style to access.")
    # also without the proxy: Host names the endpoint, the path names the bucket
    r = requests.get(emulator.oss_url + "/drop/k", headers={"Host": "oss-cn-hangzhou.aliyuncs.com"}, timeout=10)
    assert r.status_code == 403 and "<Code>SecondLevelDomainForbidden</Code>" in r.text
    # a bucket-named host without the proxy is virtual-hosted too (what ali-oss sends to an IP endpoint)
    r = requests.get(emulator.oss_url + "/k", headers={"Host": "nosuch.oss-cn-hangzhou.aliyuncs.com"}, timeout=10)
    assert r.status_code == 404 and "<Code>NoSuchBucket</Code>" in r.text


def test_proxy_refuses_hosts_it_does_not_stand_in_for(emulator):
    r = requests.get("http://example.com/drop/k", proxies=proxies(emulator), timeout=10)
    assert r.status_code == 502 and "<Code>ProxyHostNotServed</Code>" in r.text and "example.com" in r.text
    # a name of another region is not ours either
    r = requests.get("http://drop.oss-cn-beijing.aliyuncs.com/k", proxies=proxies(emulator), timeout=10)
    assert r.status_code == 502
    # control endpoints answer only on the IP, never as an object key of a named bucket
    assert requests.get(emulator.oss_url + "/-/stats", timeout=10).status_code == 200
    r = requests.get("http://drop.oss-cn-hangzhou.aliyuncs.com/-/stats", proxies=proxies(emulator), timeout=10)
    assert r.status_code == 403 and "<Code>AccessDenied</Code>" in r.text


def test_sts_through_the_proxy_then_upload_with_its_token(emulator, root_bucket):
    client = AcsClient(emulator.user.id, emulator.user.secret, emulator.region, timeout=10, connect_timeout=5,
                       proxy=proxies(emulator))
    req = AssumeRoleRequest()
    req.set_endpoint(emulator.sts_endpoint.split("//", 1)[1])
    req.set_protocol_type("http")
    req.set_RoleArn(emulator.role_arn)
    req.set_RoleSessionName("proxy")
    req.set_DurationSeconds(900)
    c = json.loads(client.do_action_with_exception(req))["Credentials"]
    b = named_bucket(emulator, c["AccessKeyId"], c["AccessKeySecret"], c["SecurityToken"])
    assert b.put_object("from-sts.txt", b"sts").status == 200
    assert root_bucket.get_object("from-sts.txt").read() == b"sts"
    assert emulator.stats()["sts_issued"] == 1


def test_endpoints_addressing_rules():
    e = Endpoints("cn-hangzhou")
    assert e.split("127.0.0.1", "/drop/a%2Fb") == ("drop", "a%2Fb")
    assert e.split("localhost", "/") == (None, "")
    assert e.split("drop.oss-cn-hangzhou.aliyuncs.com", "/a/b") == ("drop", "a/b")
    assert e.split("drop.oss-cn-hangzhou-internal.aliyuncs.com", "/") == ("drop", "")
    assert e.split("oss-cn-hangzhou.aliyuncs.com", "/") == (None, "")
    for host in ("oss-cn-hangzhou.aliyuncs.com", "a.drop.oss-cn-hangzhou.aliyuncs.com", "cdn.example.com"):
        with pytest.raises(OSSError, match="SecondLevelDomainForbidden"):
            e.split(host, "/drop/k")
    assert e.is_sts("sts.aliyuncs.com") and e.is_sts("sts.cn-hangzhou.aliyuncs.com") and not e.is_sts("sts.x")
