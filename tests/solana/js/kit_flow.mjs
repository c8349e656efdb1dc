// Drives a p2pgpu ledger server with @solana/kit: airdrop (confirmed through
// signatureSubscribe), a transfer with a memo sent with
// sendAndConfirmTransactionFactory (blockheight + signature subscriptions),
// then getTransaction (json and base64) and getEpochInfo.
// Usage: node kit_flow.mjs RPC_URL WS_URL ; prints one JSON line.
import {
  airdropFactory, appendTransactionMessageInstructions, createSolanaRpc, createSolanaRpcSubscriptions,
  createTransactionMessage, generateKeyPairSigner, getSignatureFromTransaction, lamports, pipe,
  sendAndConfirmTransactionFactory, setTransactionMessageFeePayerSigner,
  setTransactionMessageLifetimeUsingBlockhash, signTransactionMessageWithSigners,
} from "@solana/kit";
import { getTransferSolInstruction } from "@solana-program/system";
import { getAddMemoInstruction } from "@solana-program/memo";

const [url, wsUrl] = process.argv.slice(2);
const rpc = createSolanaRpc(url);
const rpcSubscriptions = createSolanaRpcSubscriptions(wsUrl);
const payer = await generateKeyPairSigner();
const to = await generateKeyPairSigner();

await airdropFactory({ rpc, rpcSubscriptions })({
  recipientAddress: payer.address, lamports: lamports(2_000_000_000n), commitment: "confirmed",
});
const balance = (await rpc.getBalance(payer.address).send()).value;

const { value: latest } = await rpc.getLatestBlockhash().send();
const message = pipe(
  createTransactionMessage({ version: 0 }),
  (m) => setTransactionMessageFeePayerSigner(payer, m),
  (m) => setTransactionMessageLifetimeUsingBlockhash(latest, m),
  (m) => appendTransactionMessageInstructions([
    getTransferSolInstruction({ source: payer, destination: to.address, amount: lamports(1_000_000n) }),
    // The SPL Memo program every cluster has (@solana-program/memo defaults to a newer address).
    getAddMemoInstruction({ memo: "p2pgpu kit test" }, { programAddress: "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr" }),
  ], m),
);
const signed = await signTransactionMessageWithSigners(message);
await sendAndConfirmTransactionFactory({ rpc, rpcSubscriptions })(signed, { commitment: "confirmed" });
const sig = getSignatureFromTransaction(signed);
const tx = await rpc.getTransaction(sig, { commitment: "confirmed", maxSupportedTransactionVersion: 0, encoding: "json" }).send();
const tx64 = await rpc.getTransaction(sig, { commitment: "confirmed", maxSupportedTransactionVersion: 0, encoding: "base64" }).send();
const toBalance = (await rpc.getBalance(to.address).send()).value;
const epoch = await rpc.getEpochInfo().send();
console.log(JSON.stringify({
  balance: Number(balance), toBalance: Number(toBalance), sig, fee: Number(tx.meta.fee), version: tx.version,
  base64: tx64.transaction[1], epochBlockHeight: Number(epoch.blockHeight),
}));
process.exit(0);
