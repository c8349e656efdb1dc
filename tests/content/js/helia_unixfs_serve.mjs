// Used by tests/content/test_ipfs_unixfs.py and the CID input tests.  Adds a
// file with Helia's UnixFS (@helia/unixfs 4, the one helia 5 ships:
// `addBytes`, raw leaves, balanced DAG) and serves its blocks with Helia's
// Bitswap on js-libp2p 2.x on 127.0.0.1.
// Usage: node helia_unixfs_serve.mjs FILE [CHUNK_BYTES [CHILDREN_MAX]]
// (without CHUNK_BYTES: addBytes' defaults, 256 KiB leaves, 174 links a node).
// Prints one JSON line {addr, cid, blocks}; stops on end of input.
import './polyfill.mjs'
import { readFileSync } from 'node:fs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { createBitswap } from '@helia/bitswap'
import { unixfs } from '@helia/unixfs'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'
import { MemoryBlockstore } from 'blockstore-core'
import { defaultLogger } from '@libp2p/logger'

const bytes = readFileSync(process.argv[2])
const options = {}
if (process.argv[3]) {
  options.chunker = fixedSize({ chunkSize: Number(process.argv[3]) })
  options.layout = balanced({ maxChildrenPerNode: Number(process.argv[4] ?? 174) })
}
const blockstore = new MemoryBlockstore()
const cid = await unixfs({ blockstore }).addBytes(bytes, options)
let blocks = 0
for await (const _ of blockstore.getAll()) blocks++
const libp2p = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()], connectionEncrypters: [noise()], streamMuxers: [yamux()],
  services: { identify: identify() }
})
const routing = { async * findProviders () {}, async provide () {}, async cancelReprovide () {}, async put () {}, async get () { throw new Error('none') }, async * getClosestPeers () {}, async findPeer () { throw new Error('none') } }
const bitswap = createBitswap({ blockstore, libp2p, routing, logger: defaultLogger() })
await bitswap.start()
console.log(JSON.stringify({ addr: libp2p.getMultiaddrs()[0].toString(), cid: cid.toString(), blocks }))
process.stdin.on('end', async () => { await bitswap.stop(); await libp2p.stop(); process.exit(0) })
process.stdin.resume()
