// devstack (appended to localstripe's Stripe.js stand-in by localstripe_server.py):
// confirmCardPayment(clientSecret, {payment_method: {card: element}}) as Stripe.js does
// it, posting the card element's data with the publishable key and the client secret
// to /v1/payment_intents/<id>/confirm; a 3-D Secure card then goes on to localstripe's
// own authentication step. Answers {paymentIntent} or {error}, as Stripe.js does.
// confirmCardSetup is the stand-in's own (it does post the card's data to
// /v1/setup_intents/<id>/confirm, which localstripe accepts with the publishable key),
// with the number's spaces taken out first as Stripe's card form does.
(function () {
  const standIn = Stripe;
  Stripe = function (key) {
    const stripe = standIn(key);
    const authenticate = stripe.confirmCardPayment;
    stripe.confirmCardPayment = async function (clientSecret, data) {
      const card = data && data.payment_method && data.payment_method.card;
      if (!card || !card.value) {
        return authenticate(clientSecret, data);
      }
      const pi = clientSecret.match(/^(pi_\w+)_secret_/)[1];
      let response;
      try {
        response = await fetch(`${LOCALSTRIPE_BASE_API}/v1/payment_intents/${pi}/confirm`, {
          method: 'POST',
          body: JSON.stringify({
            key: key,
            client_secret: clientSecret,
            payment_method_data: {type: 'card', card: Object.assign({}, card.value.card, {
              number: card.value.card.number.replace(/\s/g, '')})},
          }),
        });
      } catch (err) {
        return {error: {type: 'api_connection_error',
                        message: 'We could not reach the payment provider.'}};
      }
      const body = await response.json().catch(() => ({}));
      if (response.status !== 200 || body.error) {
        return {error: body.error || {message: 'The payment could not be confirmed.'}};
      }
      if (body.status === 'requires_action') {
        return authenticate(clientSecret, data);
      }
      return {paymentIntent: body};
    };
    const setUp = stripe.confirmCardSetup;
    stripe.confirmCardSetup = function (clientSecret, data) {
      const card = data && data.payment_method && data.payment_method.card;
      if (card && card.value && card.value.card) {
        card.value.card.number = card.value.card.number.replace(/\s/g, '');
      }
      return setUp(clientSecret, data);
    };
    return stripe;
  };
})();
