// Drives a p2pgpu ledger server with the official @solana/web3.js 1.x client:
// airdrop, a transfer with a memo, confirmation (websocket signatureSubscribe
// on port + 1, plus getSignatureStatuses / getBlockHeight), getTransaction.
// Usage: node web3_flow.mjs RPC_URL ; prints one JSON line with the results.
import {
  Connection, Keypair, LAMPORTS_PER_SOL, PublicKey, SystemProgram, Transaction,
  TransactionInstruction, sendAndConfirmTransaction,
} from "@solana/web3.js";

const url = process.argv[2];
const conn = new Connection(url, "confirmed");
const payer = Keypair.generate();
const to = Keypair.generate();

const airdropSig = await conn.requestAirdrop(payer.publicKey, 2 * LAMPORTS_PER_SOL);
const latest = await conn.getLatestBlockhash();
await conn.confirmTransaction({ signature: airdropSig, ...latest }, "confirmed");
const balance = await conn.getBalance(payer.publicKey);

const memo = "p2pgpu web3.js test";
const tx = new Transaction().add(
  SystemProgram.transfer({ fromPubkey: payer.publicKey, toPubkey: to.publicKey, lamports: 1_000_000 }),
  new TransactionInstruction({
    programId: new PublicKey("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"),
    keys: [],
    data: Buffer.from(memo, "utf8"),
  }),
);
const sig = await sendAndConfirmTransaction(conn, tx, [payer], { commitment: "confirmed" });
const got = await conn.getTransaction(sig, { commitment: "confirmed", maxSupportedTransactionVersion: 0 });
const parsed = await conn.getParsedTransaction(sig, { commitment: "confirmed", maxSupportedTransactionVersion: 0 });
const toBalance = await conn.getBalance(to.publicKey);
const epoch = await conn.getEpochInfo();
const memoData = got.transaction.message.compiledInstructions
  .filter((ix) => got.transaction.message.staticAccountKeys[ix.programIdIndex].toBase58().startsWith("Memo"))
  .map((ix) => Buffer.from(ix.data).toString("utf8"));
console.log(JSON.stringify({
  airdropSig, balance, sig, toBalance, fee: got.meta.fee, memo: memoData[0] ?? null,
  parsedOk: parsed !== null, slot: got.slot, epochBlockHeight: epoch.blockHeight,
}));
process.exit(0);
